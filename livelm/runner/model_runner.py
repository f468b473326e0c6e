"""Turns a SchedulerOutput into flat batch tensors, runs the model, samples."""

from __future__ import annotations

import torch
from torch import nn

from livelm.core.scheduler_output import (
    ModelRunnerOutput,
    PromptLogprobs,
    SampledToken,
    ScheduledChunk,
    SchedulerOutput,
)
from livelm.kernels.extensions import quant_linear_kernels
from livelm.layers.attention import (
    AttentionBackend,
    AttentionMetadata,
    PrefillSegment,
    select_attention_backend,
)
from livelm.layers.attention.kv_format import kv_row_bytes, kv_row_width
from livelm.layers.attention.sinks import sinks_segment
from livelm.layers.quantized import QuantizedModule
from livelm.models.llama import LlamaForCausalLM
from livelm.models.prepare import prepare_model
from livelm.models.rope import rotary_tables
from livelm.models.weight_update import StagedUpdate
from livelm.quant.matmul import kernel_row_breakpoints
from livelm.runner.kv_cache import allocate_kv_cache
from livelm.runner.sampling import Sampler, SamplerOutput, SamplingBatch
from livelm.runner.sampling.guard import NonFiniteLogits, RowFailure
from livelm.runner.sampling.token_mask import TokenMask
from livelm.runner.speculative import DraftRows, verify_drafts
from livelm.runner.structured import GrammarBackend, StepMasks, StructuredDecoding
from livelm.runner.structured.step import MaskJob
from livelm.runner.tensor_parallel import TensorParallelError, TensorParallelWorkers


class ModelRunner:
    """Owns the model, its KV cache tensors and per-request sampling state.

    ``structured`` (the engine's grammar backend) enables constrained requests
    (``SamplingParams.structured``): each constrained sequence gets a matcher, and its
    step's token bitmask is filled in a worker thread while the model runs. Without it a
    constrained request fails (the engine always gives one).
    """

    def __init__(
        self,
        model: LlamaForCausalLM,
        num_blocks: int,
        block_size: int,
        eos_token_ids: frozenset[int],
        attention_backend: str = "auto",
        structured: GrammarBackend | None = None,
        kv_dtype: torch.dtype | None = None,
        tensor_parallel: TensorParallelWorkers | None = None,
    ) -> None:
        self.model = model
        # Rank 0 of a tensor-parallel engine: every forward is announced to the other ranks
        # first (runner/tensor_parallel.py); ``model`` is then rank 0's shard.
        self.tp = tensor_parallel
        cfg = model.config
        param = model.norm.weight  # always a float parameter (embeddings may be quantized)
        self.device, self.dtype = param.device, param.dtype
        # The cache's storage type (EngineConfig.kv_cache_dtype, layers/attention/kv_format.py).
        self.kv_dtype = self.dtype if kv_dtype is None else kv_dtype
        self.block_size = block_size
        # The sliding layers' window (ModelConfig.sliding_window; None: every layer is global).
        self.window = cfg.sliding_window
        self.attn_backend: AttentionBackend = select_attention_backend(
            attention_backend, self.device, self.dtype, cfg.head_dim, self.kv_dtype
        )
        # Not zero-filled: no kernel reads a slot before writing it (see runner/kv_cache.py).
        self.kv_cache = allocate_kv_cache(cfg.num_layers, cfg.num_kv_heads, num_blocks * block_size,
                                          kv_row_width(self.kv_dtype, cfg.head_dim), self.kv_dtype, self.device)
        self.kv_caches = self.kv_cache.layers
        self.tied_head: nn.Module | None = prepare_model(model)
        self.sampler = Sampler()
        self.eos_token_ids = set(eos_token_ids)
        self._generators: dict[str, torch.Generator] = {}
        # Seeded generators' states at the start of the last step, so a failed step can be
        # re-run from them (a speculative step draws a varying count of numbers).
        self._generator_states: dict[str, torch.Tensor] = {}
        self.structured = StructuredDecoding(structured) if structured is not None else None
        # cos/sin for sinks requests' cache positions (layers/attention/sinks.py): the model's
        # tables, grown on demand past them (only position-independent rotary types run sinks).
        self._rope_cos, self._rope_sin = model.rotary.cos, model.rotary.sin

    @staticmethod
    def kv_bytes_per_block(model_config, block_size: int, dtype: torch.dtype) -> int:
        """Bytes one KV block takes across all layers, in the cache's storage type ``dtype``."""
        row = kv_row_bytes(dtype, model_config.head_dim)
        return 2 * model_config.num_layers * model_config.num_kv_heads * row * block_size

    def kernel_row_breakpoints(self) -> tuple[int, ...]:
        """Rows (a step's tokens) after which the model's matmuls change kernel, for the
        step cost model (core/step_cost.py): the quantized CPU dispatcher's switches when
        the model holds quantized weights on the CPU, else none."""
        if self.device.type != "cpu" or not any(isinstance(m, QuantizedModule) for m in self.model.modules()):
            return ()
        return kernel_row_breakpoints(quant_linear_kernels())

    # ------------------------------------------------------------------ execute

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step of the model over every scheduled chunk."""
        for rid in sched.finished_request_ids:
            self._generators.pop(rid, None)
        if self.structured is not None:
            self.structured.drop(sched.finished_request_ids)
        if sched.is_empty:
            return ModelRunnerOutput(sampled={})
        # Decodes first: they share one batched attention call; prefills (and every chunk of
        # a sinks request) follow one by one.
        chunks = sorted(sched.chunks, key=lambda c: not (c.is_decode and c.kv_policy is None))
        sample_chunks = [c for c in chunks if c.sample and not c.draft_token_ids]
        spec_chunks = [c for c in chunks if c.draft_token_ids]
        self._snapshot_generators(chunks)
        masks = self._start_masks(sample_chunks)
        try:
            if self.tp is not None:
                self.tp.forward(chunks)
            input_ids, positions, meta, row_of = self._prepare(chunks)
            hidden = self.model(input_ids, positions, self.kv_caches, meta)
            lp_chunks = [c for c in chunks if c.want_prompt_logprobs]
            sampled: dict[str, SampledToken] = {}
            failed: dict[str, Exception] = {}
            if sample_chunks:
                rows = torch.tensor([row_of[c.request_id][1] - 1 for c in sample_chunks], device=self.device)
                logits = self._logits_at(hidden, rows)
                sampled = self._sample(logits, sample_chunks, failed, masks.result() if masks else None)
            spec_sampled = self._verify(spec_chunks, hidden, row_of, failed) if spec_chunks else {}
            prompt_lps = {c.request_id: self._prompt_logprobs(c, hidden, row_of[c.request_id]) for c in lp_chunks}
        except Exception:
            if self.tp is not None:
                self.tp.check_alive(grace_s=2.0)  # a rank that died, not this step's requests, is the cause
            raise
        finally:
            if masks is not None:
                masks.wait()  # the worker is done with the matchers before anyone else runs
        return ModelRunnerOutput(sampled=sampled, prompt_logprobs=prompt_lps, failed=failed,
                                 spec_sampled=spec_sampled)

    @torch.inference_mode()
    def forward_only(self, chunks: list[ScheduledChunk]) -> None:
        """Run the model over ``chunks`` (in this order), writing their K/V, and nothing
        else: a tensor-parallel worker's share of rank 0's forward (runner/tensor_parallel.py)."""
        input_ids, positions, meta, _ = self._prepare(chunks)
        self._last_hidden = self.model(input_ids, positions, self.kv_caches, meta)

    @torch.inference_mode()
    def logits_only(self, rows: list[int]) -> None:
        """This rank's share of the logits of ``rows`` of the last :meth:`forward_only`
        (the vocabulary-parallel head's all-gather needs every rank)."""
        self._logits(self._last_hidden.index_select(0, torch.tensor(rows, dtype=torch.long, device=self.device)))

    @torch.inference_mode()
    def greedy_tokens(self, chunks: list[ScheduledChunk]) -> dict[str, int]:
        """Run the model over ``chunks`` (writing their K/V) and return, per request, the
        argmax token after each chunk's last position: a draft model's proposals, which
        need no sampler (runner/draft_model.py)."""
        # Decodes first, as in execute: they share one batched attention call.
        chunks = sorted(chunks, key=lambda c: not c.is_decode)
        input_ids, positions, meta, row_of = self._prepare(chunks)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)
        rows = torch.tensor([row_of[c.request_id][1] - 1 for c in chunks], device=self.device)
        tokens = self._logits(hidden.index_select(0, rows)).argmax(dim=-1).tolist()
        return {c.request_id: t for c, t in zip(chunks, tokens, strict=True)}

    def _verify(self, chunks: list[ScheduledChunk], hidden: torch.Tensor, row_of: dict[str, tuple[int, int]],
                failed: dict[str, Exception]) -> dict[str, list]:
        """Verify the drafts of ``chunks`` from the logits at every drafted position
        (runner/speculative.py)."""
        drafts: list[DraftRows] = []
        rows: list[int] = []
        for c in chunks:
            try:
                gen = self._generator(c)
            except (RuntimeError, ValueError, TypeError, OverflowError) as e:
                failed[c.request_id] = ValueError(f"seed {c.sampling_params.seed} cannot seed a random generator "
                                                  f"({e}): use a 64-bit seed")
                continue
            drafts.append(DraftRows(c, len(rows), gen))
            rows.extend(range(*row_of[c.request_id]))
        if not drafts:
            return {}
        logits = self._logits_at(hidden, torch.tensor(rows, device=self.device))
        return verify_drafts(self.sampler, logits, drafts, self.eos_token_ids, failed)

    def _snapshot_generators(self, chunks: list[ScheduledChunk]) -> None:
        """Remember where the step's seeded generators stand before anything is drawn."""
        self._generator_states = {
            c.request_id: gen.get_state() for c in chunks
            if c.sample and (gen := self._generators.get(c.request_id)) is not None
        }

    def _start_masks(self, sample_chunks: list[ScheduledChunk]) -> MaskJob | None:
        """Start filling the bitmask of the step's constrained sequences (None: none)."""
        if not any(c.sampling_params is not None and c.sampling_params.structured is not None
                   for c in sample_chunks):
            return None
        if self.structured is None:
            raise RuntimeError("this model runner has no grammar backend for structured output")
        return self.structured.start(sample_chunks)

    def execute_each(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        """After ``execute(sched)`` raised: run each chunk alone, so that a failure names
        the request that causes it (in ``failed``) and the others get their results.

        The failed attempt may have written KV for some chunks: running them again writes
        the same values into the same slots. It may also have drawn from seeded rows'
        generators: each is set back first to where it stood before that step.
        """
        sampled: dict[str, SampledToken] = {}
        spec_sampled: dict[str, list[SampledToken]] = {}
        prompt_lps: dict[str, PromptLogprobs] = {}
        failed: dict[str, Exception] = {}
        states = self._generator_states
        for chunk in sched.chunks:
            try:
                self._rewind_generator(chunk, states)
                out = self.execute(SchedulerOutput(chunks=[chunk]))
            except TensorParallelError:
                raise  # a rank is gone: no chunk is to blame
            except Exception as e:  # noqa: BLE001 - this chunk's own failure
                error = RuntimeError(f"the engine step failed for this request: {type(e).__name__}: {e}")
                error.__cause__ = e
                failed[chunk.request_id] = error
                continue
            sampled.update(out.sampled)
            spec_sampled.update(out.spec_sampled)
            prompt_lps.update(out.prompt_logprobs)
            failed.update(out.failed)
        return ModelRunnerOutput(sampled=sampled, prompt_logprobs=prompt_lps, failed=failed,
                                 spec_sampled=spec_sampled)

    def _logits_at(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """fp32 logits of the given rows of this step's hidden states. Split over ranks, the
        LM head is vocabulary-parallel: the workers are told the rows first, and every
        rank computes its share of the vocabulary for them (runner/tensor_parallel.py)."""
        if self.tp is not None:
            self.tp.logits(rows.tolist())
        return self._logits(hidden.index_select(0, rows))

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.tied_head is not None:
            return self.tied_head(hidden).float()
        return self.model.compute_logits(hidden)

    def _prepare(self, chunks: list[ScheduledChunk]):
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        row_of: dict[str, tuple[int, int]] = {}
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefill_specs: list[tuple[int, int, int, list[int]]] = []
        sinks_specs: list[tuple[int, ScheduledChunk]] = []
        for c in chunks:
            start_row = len(ids)
            ids.extend(c.token_ids)
            end = c.start_position + c.num_tokens
            positions = range(c.start_position, end)
            if c.kv_policy is not None:
                # q and k leave the model unrotated (position 0 rotates by exactly nothing);
                # the sinks path rotates them by their cache positions.
                pos.extend([0] * c.num_tokens)
                slot_of = _logical_slots(c, bs)
                slots.extend(slot_of(p) for p in positions)
                row_of[c.request_id] = (start_row, len(ids))
                sinks_specs.append((start_row, c))
                continue
            pos.extend(positions)
            table = c.block_ids
            # A sliding-window request that released the blocks before its window (every
            # layer slides) holds text block i in block_ids[i - evicted]: attention sees
            # its context from the first kept block on, key positions shifted by ``off``.
            # Every layer's mask (causal, and the window) depends on key and query
            # positions only through their difference, so the shift changes nothing, and
            # no step reads or builds more than the kept blocks.
            off = c.num_evicted_blocks * bs
            slots.extend(table[(p - off) // bs] * bs + p % bs for p in positions)
            row_of[c.request_id] = (start_row, len(ids))
            if c.is_decode:
                decode_tables.append(table[: -(-(end - off) // bs)])
                decode_lens.append(end - off)
            else:
                prefill_specs.append((start_row, c.num_tokens, c.start_position - off, table))

        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            num_decodes=len(decode_lens),
            decode_block_tables=None,
            decode_lens=None,
            block_size=bs,
            prefills=[],
            backend=self.attn_backend,
            window=self.window,
        )
        if decode_lens:
            max_blocks = max(len(t) for t in decode_tables)
            table = torch.tensor([t + [0] * (max_blocks - len(t)) for t in decode_tables], dtype=torch.long, device=dev)
            lens = torch.tensor(decode_lens, dtype=torch.long, device=dev)
            meta.decode_block_tables, meta.decode_lens = table, lens
        for start_row, n, start_pos, table in prefill_specs:
            if start_pos == 0:
                meta.prefills.append(PrefillSegment(start_row, n, None, None))
                continue
            ctx = start_pos + n
            offsets = torch.arange(ctx, device=dev)
            tbl = torch.tensor(table[: -(-ctx // bs)], dtype=torch.long, device=dev)
            ctx_slots = tbl[offsets // bs] * bs + offsets % bs
            meta.prefills.append(PrefillSegment(start_row, n, ctx_slots, None))
        for start_row, c in sinks_specs:
            policy = c.kv_policy
            meta.sinks.append(sinks_segment(policy.num_sink_tokens, policy.window, start_row, c.start_position,
                                            c.num_tokens, _logical_slots(c, bs), self._rope_rows, dev,
                                            c.kv_floor))
        self.attn_backend.prepare(meta, self.dtype)  # what only this backend reads
        input_ids = torch.tensor(ids, dtype=torch.long, device=dev)
        positions_t = torch.tensor(pos, dtype=torch.long, device=dev)
        return input_ids, positions_t, meta, row_of

    def _rope_rows(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [N, half] at ``positions`` in the activations' dtype (tables grown as needed)."""
        need = int(positions.max()) + 1
        if need > self._rope_cos.shape[0]:
            cfg = self.model.config
            cos, sin = rotary_tables(cfg.head_dim, max(need, 2 * self._rope_cos.shape[0]), cfg.rope)
            self._rope_cos, self._rope_sin = cos.to(self.device), sin.to(self.device)
        return self._rope_cos[positions].to(self.dtype), self._rope_sin[positions].to(self.dtype)

    # ----------------------------------------------------------------- sampling

    def _sample(
        self,
        logits: torch.Tensor,
        chunks: list[ScheduledChunk],
        failed: dict[str, Exception],
        masks: StepMasks | None = None,
    ) -> dict[str, SampledToken]:
        """Sample a token for each chunk; a row that cannot be sampled (a seed the generator
        refuses, logits that are not finite, a constraint that failed) goes into ``failed``
        and the rest are sampled again without it: nothing was drawn yet, so their tokens
        are those of a batch without it."""
        if masks is not None and masks.errors:
            failed.update((rid, e) for rid, e in masks.errors.items() if rid in {c.request_id for c in chunks})
            keep = [i for i, c in enumerate(chunks) if c.request_id not in masks.errors]
            if not keep:
                return {}
            chunks = [chunks[i] for i in keep]
            logits = logits.index_select(0, torch.tensor(keep, device=logits.device))
        while True:
            try:
                out = self.sampler(logits, self._sampling_batch(chunks, masks))
                return self._to_sampled(chunks, out)
            except RowFailure as e:
                for i, error in e.errors.items():
                    failed[chunks[i].request_id] = self._row_error(error, logits[i])
                keep = [i for i in range(len(chunks)) if i not in e.errors]
                if not keep:
                    return {}
                chunks = [chunks[i] for i in keep]
                logits = logits.index_select(0, torch.tensor(keep, device=logits.device))

    @staticmethod
    def _row_error(error: Exception, raw_logits: torch.Tensor) -> Exception:
        # Non-finite after penalties/temperature: the request's parameters did it (a 400)
        # unless the model's own logits were not finite already (a 500).
        if isinstance(error, NonFiniteLogits) and not bool(torch.isfinite(raw_logits).all()):
            return RuntimeError("the model produced non-finite logits (NaN or Inf) for this request")
        return error

    def _generator(self, chunk: ScheduledChunk) -> torch.Generator | None:
        seed = chunk.sampling_params.seed
        if seed is None or chunk.sampling_params.greedy:
            return None
        gen = self._generators.get(chunk.request_id)
        if gen is None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed + chunk.seed_offset)
            self._generators[chunk.request_id] = gen
        return gen

    def _rewind_generator(self, chunk: ScheduledChunk, states: dict[str, torch.Tensor]) -> None:
        """Set a seeded request's generator back to where it stood before the failed step
        (``states``, taken then); one the step created starts again from its seed."""
        state = states.get(chunk.request_id)
        gen = self._generators.get(chunk.request_id)
        if state is not None and gen is not None:
            gen.set_state(state)
        else:
            self._generators.pop(chunk.request_id, None)

    @staticmethod
    def _token_mask(chunks: list[ScheduledChunk], masks: StepMasks | None) -> TokenMask | None:
        """The constrained rows of ``chunks`` and their bitmask rows."""
        if masks is None or not masks.row_of:
            return None
        rows = [i for i, c in enumerate(chunks) if c.request_id in masks.row_of]
        if not rows:
            return None
        mask_rows = [masks.row_of[chunks[i].request_id] for i in rows]
        bitmask = masks.bitmask
        if mask_rows != list(range(bitmask.shape[0])):
            bitmask = bitmask.index_select(0, torch.tensor(mask_rows))
        return TokenMask(rows, bitmask)

    def _sampling_batch(self, chunks: list[ScheduledChunk], masks: StepMasks | None = None) -> SamplingBatch:
        eos = self.eos_token_ids
        generators: list[torch.Generator | None] = []
        bad: dict[int, Exception] = {}
        for i, c in enumerate(chunks):
            try:
                generators.append(self._generator(c))
            except (RuntimeError, ValueError, TypeError, OverflowError) as e:
                seed = c.sampling_params.seed
                bad[i] = ValueError(f"seed {seed} cannot seed a random generator ({e}): use a 64-bit seed")
                generators.append(None)
        if bad:
            raise RowFailure(bad)
        return SamplingBatch(
            params=[c.sampling_params for c in chunks],
            prompt_token_ids=[c.prompt_token_ids for c in chunks],
            output_token_ids=[c.output_token_ids for c in chunks],
            generators=generators,
            eos_token_ids=[set() if c.sampling_params.ignore_eos else eos for c in chunks],
            token_mask=self._token_mask(chunks, masks),
        )

    @staticmethod
    def _to_sampled(chunks: list[ScheduledChunk], out: SamplerOutput) -> dict[str, SampledToken]:
        tokens = out.token_ids.tolist()
        lps = out.logprobs.tolist() if out.logprobs is not None else None
        ranks = out.ranks.tolist() if out.ranks is not None else None
        top_ids = out.top_ids.tolist() if out.top_ids is not None else None
        top_lps = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        slps = out.sampling_logprobs.tolist() if out.sampling_logprobs is not None else None
        result: dict[str, SampledToken] = {}
        for i, c in enumerate(chunks):
            k = c.sampling_params.logprobs
            slp = slps[i] if slps is not None and c.sampling_params.sampling_logprobs else None
            if k is None or lps is None:
                result[c.request_id] = SampledToken(tokens[i], sampling_logprob=slp)
                continue
            result[c.request_id] = SampledToken(
                token_id=tokens[i],
                logprob=lps[i],
                rank=ranks[i],
                top_ids=top_ids[i][:k] if top_ids else [],
                top_logprobs=top_lps[i][:k] if top_lps else [],
                sampling_logprob=slp,
            )
        return result

    @torch.inference_mode()
    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy whole KV blocks (source, destination) in every layer: a fork's copy-on-write
        of its parent's partial last block (docs/rl.md)."""
        if self.tp is not None:
            self.tp.copy_blocks(copies)
        bs = self.block_size
        for src, dst in copies:
            for k, v in self.kv_caches:
                k[:, dst * bs : (dst + 1) * bs].copy_(k[:, src * bs : (src + 1) * bs])
                v[:, dst * bs : (dst + 1) * bs].copy_(v[:, src * bs : (src + 1) * bs])

    def load_weights(self, staged: StagedUpdate) -> None:
        """Swap staged new weights in (between steps; see models/weight_update.py)."""
        if self.tp is not None:
            raise ValueError("weight updates are not supported with tensor_parallel_size > 1")
        staged.apply(self.model)
        if staged.tied_head_changed:
            self.tied_head = staged.tied_head

    def _prompt_logprobs(self, c: ScheduledChunk, hidden: torch.Tensor, rows: tuple[int, int]) -> PromptLogprobs:
        # Position p's logits score prompt token p + 1; stop before the last prompt token's
        # logits, which score the first output token (reported as a sampled logprob).
        prompt_len = len(c.prompt_token_ids)
        first, last = c.start_position, min(c.start_position + c.num_tokens, prompt_len - 1)
        k = c.sampling_params.prompt_logprobs or 0
        if last <= first:
            return PromptLogprobs(first + 1, [], [], [], [])
        at = torch.arange(rows[0], rows[0] + (last - first), device=self.device)
        logprobs = torch.log_softmax(self._logits_at(hidden, at), dim=-1)
        targets = torch.tensor(c.prompt_token_ids[first + 1 : last + 1], device=self.device)
        tok_lp = logprobs.gather(1, targets[:, None]).squeeze(1)
        ranks = (logprobs > tok_lp[:, None]).sum(-1) + 1
        top_lp, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], logprobs[:, :0].long())
        return PromptLogprobs(
            start_index=first + 1,
            token_logprobs=tok_lp.tolist(),
            ranks=ranks.tolist(),
            top_ids=top_ids.tolist(),
            top_logprobs=top_lp.tolist(),
        )



def _logical_slots(chunk: ScheduledChunk, block_size: int):
    """Text position -> cache slot through a sinks request's logical block table (its sink
    blocks, then the blocks from ``num_evicted_blocks`` past them)."""
    table, evicted = chunk.block_ids, chunk.num_evicted_blocks
    nsb = chunk.kv_policy.num_sink_blocks(block_size)

    def slot_of(p: int) -> int:
        i = p // block_size
        return table[i if i < nsb else i - evicted] * block_size + p % block_size

    return slot_of
