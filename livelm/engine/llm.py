"""The offline Python API: ``LLM(model).generate(prompts, params)``."""

from __future__ import annotations

from collections.abc import Sequence

from tqdm.auto import tqdm

from livelm.engine.frontend import Frontend, make_engine_config
from livelm.outputs import RequestOutput
from livelm.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    """Run a model over batches of prompts, with continuous batching inside.

    ``model`` is a local Hugging Face directory, a ``.gguf`` file, a hub id, or None for the
    embedded default model (SmolLM2-135M-Instruct). Other keyword arguments are
    :class:`livelm.config.EngineConfig` fields (dtype, max_model_len, kv_cache_gib, ...).
    """

    def __init__(self, model: str | None = None, **kwargs) -> None:
        self._frontend = Frontend(make_engine_config(model, kwargs))

    @property
    def tokenizer(self):
        """The model's Hugging Face tokenizer."""
        return self._frontend.tokenizer

    @property
    def engine(self) -> Frontend:
        """The engine behind this API (for stats and tests)."""
        return self._frontend

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Complete every prompt; outputs come back in the order of the prompts.

        ``prompts`` is a string, a list of token ids, or a list of either. One
        SamplingParams applies to all prompts; a list gives one per prompt.
        """
        prompt_list = _as_prompt_list(prompts)
        params_list = _as_params_list(sampling_params, len(prompt_list))
        return self._run(prompt_list, params_list, use_tqdm)

    def chat(
        self,
        conversations: list[dict] | Sequence[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Reply to one conversation (a list of {"role", "content"} messages) or to several."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        prompt_list = [self._frontend.chat_ids(list(c)) for c in conversations]
        params_list = _as_params_list(sampling_params, len(prompt_list))
        return self._run(prompt_list, params_list, use_tqdm)

    def _run(self, prompts: list[Prompt], params: list[SamplingParams], use_tqdm: bool) -> list[RequestOutput]:
        fe = self._frontend
        ids = []
        try:
            for prompt, p in zip(prompts, params, strict=True):
                rid = fe.new_request_id()
                fe.add(rid, prompt, p)
                ids.append(rid)
            results: dict[str, RequestOutput] = {}
            bar = tqdm(total=len(ids), desc="Generating", disable=not use_tqdm or len(ids) < 2)
            while len(results) < len(ids):
                for state, _ in fe.step():
                    if state.finished:
                        results[state.request_id] = state.final_output()
                        bar.update(1)
            bar.close()
            return [results[rid] for rid in ids]
        except BaseException:
            # A bad prompt in the middle, or Ctrl-C: release everything this call queued.
            for rid in ids:
                fe.abort(rid)
            raise


def _as_prompt_list(prompts) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, Sequence) and prompts and all(isinstance(t, int) for t in prompts):
        return [list(prompts)]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    return prompts


def _as_params_list(params, count: int) -> list[SamplingParams]:
    if params is None:
        params = SamplingParams()
    if isinstance(params, SamplingParams):
        return [params] * count
    params = list(params)
    if len(params) != count:
        raise ValueError(f"got {len(params)} SamplingParams for {count} prompts")
    return params
