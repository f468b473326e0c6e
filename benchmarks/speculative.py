"""Speculative decoding on the default model: n-gram and suffix drafts vs plain decoding.

Same process, same prompts, greedy (so every livelm run produces the same tokens), an
untimed warm-up per engine. Workloads:

(1) input-grounded, where the answer copies from the prompt, built from text shipped in
    this checkout: edit a given code file (rename a name, print the whole file), turn a
    given CSV table into a Markdown table, summarise a given document quoting it;
(2) open-ended generation (stories, explanations): the ratio target is >= 0.95x;
(3) a repeated agent loop: the same tool-call scaffold, many turns in a row, each turn's
    prompt holding the earlier turns (suffix drafter vs n-gram).

Each runs single-stream (one request at a time; decode tokens/s = tokens after the first
/ time from first to last token, from ``RequestOutput.metrics``) and 8 concurrent (8
prompts in one ``LLM.chat``; output tokens / wall time). The three engines (off, ngram,
suffix) are loaded at once and every prompt runs on each in turn, so the load of the
shared machine drifts alike for all of them. llama.cpp runs the same
prompt token ids single-stream, plain and with ``LlamaPromptLookupDecoding`` (its
prompt-lookup decoding in llama-cpp-python), from the same GGUF file.
``--draft-model PATH`` adds a fourth engine, ``speculative_method="draft"`` with that draft
model (``self``: the default model drafting for itself, the upper bound of acceptance;
``layers:N``: the default model cut to its first N layers, embedding, final norm and head
kept: a cheap draft of the same tokenizer, untrained for the cut, so it shows what the
draft path costs against what it earns).

Usage::

    python benchmarks/speculative.py            # full
    python benchmarks/speculative.py --quick    # smaller, for a smoke run

Results go to stdout and one JSON line to ``benchmarks/results/speculative.jsonl``, with
the load average at start and end (the machine is shared: figures taken under load).
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO_ROOT, append_jsonl, utc_now  # noqa: E402

from livelm import SamplingParams  # noqa: E402
from livelm.bench.machine import git_commit, machine_info  # noqa: E402
from livelm.engine.llm import LLM  # noqa: E402
from livelm.models.default_model import default_gguf_path, default_model_dir  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "results" / "speculative.jsonl"
METHODS = (None, "ngram", "suffix")


def _read(rel: str, chars: int) -> str:
    return (REPO_ROOT / rel).read_text()[:chars]


def _table_csv(rows: int) -> str:
    # A table of this checkout's benchmark scripts: name, lines, bytes.
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(["file", "lines", "bytes"])
    for p in sorted((REPO_ROOT / "benchmarks").glob("*.py"))[:rows]:
        text = p.read_text()
        w.writerow([p.name, text.count("\n"), len(text.encode())])
    return out.getvalue()


def grounded_tasks(n: int) -> list[list[dict]]:
    """Input-grounded prompts (chat conversations), ``n`` of them, cycling the kinds."""
    files = ["livelm/core/block_pool.py", "livelm/core/token_ids.py", "livelm/core/prefix_grouping.py",
             "livelm/runner/sampling/rows.py", "livelm/engine/errors.py", "livelm/core/request_options.py",
             "livelm/runner/sampling/batch.py", "livelm/engine/fork.py"]
    docs = ["README.md", "docs/architecture.md", "docs/sessions.md", "docs/kernels.md"]
    tasks = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            code = _read(files[i % len(files)], 1800)
            msg = ("Here is a Python file. Rename the variable `self` to `this` everywhere and "
                   f"print the whole edited file, nothing else.\n\n```python\n{code}\n```")
        elif kind == 1:
            msg = ("Convert this CSV table to a Markdown table with the same rows and columns, "
                   f"nothing else.\n\n{_table_csv(8 + i % 5)}")
        else:
            doc = _read(docs[i % len(docs)], 1800)
            msg = ("Summarise the following document in a few sentences, quoting its key "
                   f"sentences word for word.\n\n{doc}")
        tasks.append([{"role": "user", "content": msg}])
    return tasks


def open_ended_tasks(n: int) -> list[list[dict]]:
    """Open-ended prompts: nothing in the prompt to copy."""
    topics = ["Write a short story about a lighthouse keeper who finds a message in a bottle.",
              "Explain how rainbows form, for a ten-year-old.",
              "Write a poem about autumn in a big city.",
              "Describe a day in the life of a honeybee.",
              "Give advice to someone starting to learn the piano.",
              "Write a letter from a sailor to his family.",
              "Explain why the sky is blue.",
              "Invent a new board game and describe its rules."]
    return [[{"role": "user", "content": topics[i % len(topics)]}] for i in range(n)]


SCAFFOLD = (
    "You are an agent. Reply with exactly one tool call in this format and nothing else:\n"
    '<tool_call>{"name": "search_files", "arguments": {"query": "...", "path": "src/", '
    '"max_results": 10, "case_sensitive": false}}</tool_call>\n'
)


def agent_turns(turns: int) -> list[list[dict]]:
    """A growing agent conversation: turn ``t`` holds the scaffold, the earlier calls and
    their (fixed) tool results, and asks for the next search."""
    queries = ["parse_config", "load_weights", "KVCacheManager", "def schedule", "block_size",
               "SamplingParams", "prefix cache", "tokenizer", "attention backend", "fork"]
    conv: list[dict] = [{"role": "system", "content": SCAFFOLD}]
    out = []
    for t in range(turns):
        q = queries[t % len(queries)]
        conv = [*conv, {"role": "user", "content": f"Search the source for {q!r}."}]
        out.append(conv)
        call = ('<tool_call>{"name": "search_files", "arguments": {"query": "' + q +
                '", "path": "src/", "max_results": 10, "case_sensitive": false}}</tool_call>')
        conv = [*conv, {"role": "assistant", "content": call},
                {"role": "user", "content": f"Tool result: 3 matches for {q!r} in src/."}]
    return out


def _decode_rate(out) -> tuple[int, float]:
    """(tokens, seconds from the first token to the last) of one finished output."""
    m = out.metrics
    n = len(out.outputs[0].token_ids)
    return n, m["last_token_time"] - m["first_token_time"]


class Runner:
    """One engine per method, all loaded at once: every prompt runs on each engine in turn,
    so load changes on the shared machine hit the methods alike."""

    def __init__(self, methods: tuple[str | None, ...], k: int, max_tokens: int,
                 draft_model: str | None = None) -> None:
        self.engines = {m or "off": LLM(None, speculative_method=m, num_speculative_tokens=k,
                                        **({"speculative_draft_model": draft_model} if m == "draft" else {}))
                        for m in methods}
        self.params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
        warm = SamplingParams(temperature=0.0, max_tokens=16)
        for llm in self.engines.values():
            llm.chat([{"role": "user", "content": "Hello"}], warm, use_tqdm=False)
        self.results: dict[str, dict] = {name: {"method": name} for name in self.engines}

    def _counters(self, llm: LLM) -> tuple[int, int, int]:
        s = llm.engine.stats()
        return s.spec_num_drafts, s.spec_num_draft_tokens, s.spec_num_accepted_tokens

    def _add(self, name: str, key: str, tokens: int, seconds: float, before, llm: LLM, outs) -> None:
        r = self.results[name].setdefault(key, {"tokens": 0, "seconds": 0.0, "drafts": 0, "drafted": 0,
                                                 "accepted": 0, "outputs": []})
        r["tokens"] += tokens
        r["seconds"] += seconds
        after = self._counters(llm)
        for i, field in enumerate(("drafts", "drafted", "accepted")):
            r[field] += after[i] - before[i]
        r["outputs"].extend(outs)

    def single(self, key: str, convs: list[list[dict]]) -> None:
        """Each conversation alone, on every engine in turn: decode tokens/s."""
        for c in convs:
            for name, llm in self.engines.items():
                before = self._counters(llm)
                out = llm.chat(c, self.params, use_tqdm=False)[0]
                n, secs = _decode_rate(out)
                self._add(name, key, n - 1, secs, before, llm, [out.outputs[0].token_ids])

    def concurrent(self, key: str, convs: list[list[dict]], rounds: int) -> None:
        """All ``convs`` in one batch, ``rounds`` times per engine (interleaved): tokens/s."""
        for _ in range(rounds):
            for name, llm in self.engines.items():
                before = self._counters(llm)
                t = time.perf_counter()
                outs = llm.chat(convs, self.params, use_tqdm=False)
                wall = time.perf_counter() - t
                toks = [o.outputs[0].token_ids for o in outs]
                self._add(name, key, sum(len(x) for x in toks), wall, before, llm, toks)

    def summary(self) -> dict[str, dict]:
        """Per method and workload: tokens/s, acceptance, mean accepted length, ratio vs off."""
        out: dict[str, dict] = {}
        for name, workloads in self.results.items():
            out[name] = {}
            for key, r in workloads.items():
                if key == "method":
                    continue
                off = self.results["off"][key]
                out[name][key] = {
                    "tok_s": r["tokens"] / r["seconds"],
                    "ratio_vs_off": (r["tokens"] / r["seconds"]) / (off["tokens"] / off["seconds"]),
                    "drafted": r["drafted"], "accepted": r["accepted"],
                    "acceptance_rate": r["accepted"] / r["drafted"] if r["drafted"] else 0.0,
                    "mean_accepted_length": 1 + r["accepted"] / r["drafts"] if r["drafts"] else 0.0,
                    "tokens_identical_to_off": r["outputs"] == off["outputs"],
                    "output_tokens": sum(len(x) for x in r["outputs"]),
                }
        return out


def run_llama_cpp(prompts: list[list[int]], max_tokens: int, lookup: bool, threads: int) -> float | None:
    """llama.cpp's single-stream decode tokens/s over ``prompts`` (None: not installed)."""
    try:
        from llama_cpp import Llama
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
    except ImportError:
        return None
    draft = LlamaPromptLookupDecoding(num_pred_tokens=10) if lookup else None
    # A draft model needs the logits of every position (llama-cpp-python fails without it).
    llm = Llama(str(default_gguf_path()), n_ctx=4096, n_threads=threads, verbose=False, draft_model=draft,
                logits_all=lookup)
    llm.create_completion(prompts[0], max_tokens=8, temperature=0.0)  # warm-up
    toks = secs = 0.0
    for p in prompts:
        first = last = None
        n = 0
        for _ in llm.create_completion(p, max_tokens=max_tokens, temperature=0.0, stream=True):
            now = time.perf_counter()
            first = first or now
            last = now
            n += 1
        if n > 1:
            toks += n - 1
            secs += last - first
    return toks / secs if secs else None


def _report(runner: Runner, key: str) -> None:
    """Print one workload's figures as soon as it is done."""
    for name, workloads in runner.summary().items():
        r = workloads[key]
        print(f"livelm {name:>6} {key:<24} {r['tok_s']:7.1f} tok/s  {r['ratio_vs_off']:.2f}x off  "
              f"acceptance {r['acceptance_rate']:.2f}  mean accepted length {r['mean_accepted_length']:.2f}  "
              f"({r['accepted']}/{r['drafted']})  identical to off: {r['tokens_identical_to_off']}  "
              f"(load {os.getloadavg()[0]:.1f})", flush=True)


def layer_cut_draft(src: Path, dst: Path, num_layers: int) -> Path:
    """``src``'s model (an HF directory, quantized tensors included) cut to its first
    ``num_layers`` layers, written to ``dst``."""
    import json
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    from livelm.quant.storage import QUANT_METADATA_KEY

    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(f, dst / f.name)
    config = json.loads((src / "config.json").read_text())
    if not 1 <= num_layers < config["num_hidden_layers"]:
        raise SystemExit(f"layers:N needs 1 <= N < {config['num_hidden_layers']}")
    config["num_hidden_layers"] = num_layers
    (dst / "config.json").write_text(json.dumps(config))

    def kept(name: str) -> bool:
        parts = name.split(".")
        return "layers" not in parts or int(parts[parts.index("layers") + 1]) < num_layers

    tensors, formats = {}, {}
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            formats.update({k: v for k, v in json.loads((h.metadata() or {}).get(QUANT_METADATA_KEY, "{}")).items()
                            if kept(k)})
            tensors.update({k: h.get_tensor(k) for k in h.keys() if kept(k)})
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt", QUANT_METADATA_KEY: json.dumps(formats)})
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer prompts and tokens (a smoke run)")
    ap.add_argument("--num-speculative-tokens", type=int, default=5)
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--draft-model", default=None,
                    help="also run speculative_method=draft with this draft model ('self': the default "
                         "model drafting for itself, an upper bound on acceptance; 'layers:N': the default "
                         "model cut to its first N layers)")
    args = ap.parse_args()
    n_single, max_tokens, turns, rounds = (3, 64, 4, 1) if args.quick else (4, 96, 6, 1)
    grounded = grounded_tasks(8)
    open_ended = open_ended_tasks(8)
    agent = agent_turns(turns)
    load_start = os.getloadavg()
    print(f"load average at start: {load_start}", flush=True)
    methods = METHODS + (("draft",) if args.draft_model else ())
    draft = str(default_model_dir()) if args.draft_model == "self" else args.draft_model
    if args.draft_model and args.draft_model.startswith("layers:"):
        import tempfile

        cut = Path(tempfile.mkdtemp(prefix="livelm-draft-"))
        draft = str(layer_cut_draft(default_model_dir(), cut, int(args.draft_model.split(":", 1)[1])))
    runner = Runner(methods, args.num_speculative_tokens, max_tokens, draft)
    runner.single("grounded_single", grounded[:n_single])
    _report(runner, "grounded_single")
    runner.concurrent("grounded_concurrent8", grounded, rounds)
    _report(runner, "grounded_concurrent8")
    runner.single("open_ended_single", open_ended[:n_single])
    _report(runner, "open_ended_single")
    runner.concurrent("open_ended_concurrent8", open_ended, rounds)
    _report(runner, "open_ended_concurrent8")
    runner.single("agent_single", agent)
    _report(runner, "agent_single")
    summary = runner.summary()
    llama = {}
    if not args.no_llama_cpp:
        chat_ids = runner.engines["off"].engine.chat_ids
        del runner
        threads = os.cpu_count() or 1
        for name, convs in (("grounded_single", grounded[:n_single]), ("open_ended_single", open_ended[:n_single])):
            ids = [chat_ids(c) for c in convs]
            plain = run_llama_cpp(ids, max_tokens, False, threads)
            if plain is None:
                print("llama-cpp-python is not installed: no llama.cpp comparison")
                break
            lookup = run_llama_cpp(ids, max_tokens, True, threads)
            llama[name] = {"plain_tok_s": plain, "prompt_lookup_tok_s": lookup, "ratio": lookup / plain}
            print(f"llama.cpp {name}: {plain:.1f} tok/s plain, {lookup:.1f} with prompt lookup "
                  f"({lookup / plain:.2f}x)", flush=True)
    load_end = os.getloadavg()
    print(f"load average at end: {load_end} (a shared machine: figures taken under load)")
    append_jsonl(RESULTS, {
        "time": utc_now(), "commit": git_commit(), "machine": machine_info(None), "quick": args.quick,
        "load_avg_start": load_start, "load_avg_end": load_end, "max_tokens": max_tokens,
        "num_speculative_tokens": args.num_speculative_tokens, "draft_model": args.draft_model,
        "livelm": summary, "llama_cpp": llama,
    })


if __name__ == "__main__":
    main()
