"""The offline Python API: ``LLM(model).generate(prompts, params)``."""

from __future__ import annotations

from collections.abc import Sequence

from tqdm.auto import tqdm

from livelm.core.prefix_grouping import prefix_grouped_order
from livelm.core.request_options import RequestOptions
from livelm.engine.engine import Engine, make_engine_config
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
        self._engine = Engine(make_engine_config(model, kwargs))

    @property
    def tokenizer(self):
        """The model's Hugging Face tokenizer."""
        return self._engine.tokenizer

    @property
    def engine(self) -> Engine:
        """The engine behind this API (for stats and tests)."""
        return self._engine

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        session_id: str | None = None,
        group_prefixes: bool | None = None,
    ) -> list[RequestOutput]:
        """Complete every prompt; outputs come back in the order of the prompts.

        ``prompts`` is a string, a list of token ids, or a list of either. One
        SamplingParams applies to all prompts; a list gives one per prompt.

        ``session_id`` (one prompt only) makes this a turn of that session: its KV stays
        pinned afterwards (see ``close_session``), so a next turn that extends the history
        prefills only the new tokens; a per-prompt session goes in
        ``SamplingParams.extra["session_id"]``. ``group_prefixes`` (default: the engine's
        ``prefix_grouping``, with prefix caching on) submits prompts that share a prefix
        together, decode-heavy ones first, so shared KV is computed once.
        """
        prompt_list = _as_prompt_list(prompts)
        params_list = _as_params_list(sampling_params, len(prompt_list))
        options = self._options(params_list, session_id)
        return self._run(prompt_list, params_list, options, use_tqdm, group_prefixes)

    def chat(
        self,
        conversations: list[dict] | Sequence[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        session_id: str | None = None,
    ) -> list[RequestOutput]:
        """Reply to one conversation (a list of {"role", "content"} messages) or to several.

        ``session_id`` works as in :meth:`generate` (one conversation only).
        """
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        prompt_list = [self._engine.chat_ids(list(c)) for c in conversations]
        params_list = _as_params_list(sampling_params, len(prompt_list))
        options = self._options(params_list, session_id)
        return self._run(prompt_list, params_list, options, use_tqdm, None)

    def close_session(self, session_id: str) -> bool:
        """Release a session's pinned KV now (else it goes when its TTL ends).

        Returns False when the session has no pin and no turn in flight.
        """
        return self._engine.scheduler.close_session(session_id)

    @staticmethod
    def _options(params: list[SamplingParams], session_id: str | None) -> list[RequestOptions]:
        """Each prompt's session and salt, from ``SamplingParams.extra`` and ``session_id``."""
        if session_id is not None and len(params) != 1:
            raise ValueError(
                "session_id names one conversation: give one prompt, or put a session per "
                "prompt in SamplingParams.extra['session_id']"
            )
        return [RequestOptions.from_extra(p.extra, session_id) for p in params]

    def _submission_order(self, token_ids: list[list[int]], params: list[SamplingParams],
                          group_prefixes: bool | None) -> list[int]:
        config = self._engine.config
        if group_prefixes is None:
            group_prefixes = config.prefix_grouping and config.enable_prefix_caching
        if not group_prefixes or len(token_ids) < 2:
            return list(range(len(token_ids)))
        max_len = self._engine.max_model_len
        decode = [
            p.max_tokens if p.max_tokens is not None else max_len - len(ids)
            for ids, p in zip(token_ids, params, strict=True)
        ]
        return prefix_grouped_order(token_ids, decode, config.block_size)

    def _run(self, prompts: list[Prompt], params: list[SamplingParams], options: list[RequestOptions],
             use_tqdm: bool, group_prefixes: bool | None) -> list[RequestOutput]:
        fe = self._engine
        ids = [fe.new_request_id() for _ in prompts]
        added = []
        try:
            token_ids = [
                fe.prompt_ids(p) if not isinstance(p, str) or p else [] for p in prompts
            ]
            for i in self._submission_order(token_ids, params, group_prefixes):
                fe.add(ids[i], prompts[i], params[i], token_ids[i], options=options[i])
                added.append(ids[i])
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
            for rid in added:
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
