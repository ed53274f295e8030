"""Our GPT as a language model of EleutherAI's lm-evaluation-harness (lm_eval's `TemplateLM`).

lm_eval asks a model three things, and this answers each the way its own HuggingFace backend
(`lm_eval.models.huggingface.HFLM`) does, so that the same weights give the same numbers:

- loglikelihood: log P(continuation | context) summed over the continuation's tokens, and whether
  greedy decoding would have written it. Requests run in batches, longest first, right-padded; a
  context too long for block_size is cut from the left (HFLM's truncation).
- loglikelihood_rolling: a whole text's log-likelihood (perplexity tasks), in windows of
  block_size as `lm_eval.utils.get_rolling_token_windows` cuts them, each window conditioned on
  the end-of-text token first (or on the previous window).
- generate_until: the model's own KV-cache generation (`GPT.generate`), greedy unless the task
  asks to sample, ending at max_gen_toks or as soon as a stop string appears.

Importing this module imports lm_eval: `nanogpt.evals.harness.require_lm_eval` says what to
install when it is missing, before anything gets here.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from nanogpt.model import GPT

# what lm_eval's HFLM generates at most when a task does not say (its max_gen_toks)
DEFAULT_MAX_GEN_TOKS = 256


class GPTLM(TemplateLM):
    """lm_eval's view of a GPT and its tokenizer (nanogpt.data.tokenizer: tiktoken or characters).

    model: a GPT in eval mode on `device`; autocast: a context manager factory for the forward
    passes (hardware.autocast), or None; batch_size: sequences per forward pass."""

    def __init__(self, model: GPT, tokenizer, device: str = "cpu", batch_size: int = 8,
                 autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS):
        super().__init__()
        self.model, self.tokenizer, self._device = model, tokenizer, torch.device(device)
        self._batch_size, self.max_gen_toks = int(batch_size), int(max_gen_toks)
        self.autocast = autocast or contextlib.nullcontext
        # logits past the tokenizer's vocabulary (nanoGPT pads GPT-2's 50257 to 50304) are ids no
        # text can hold: the distribution is over the tokenizer's tokens only
        self.vocab_size = min(tokenizer.vocab_size, model.config.vocab_size)

    # --- what lm_eval asks about the model ---

    @property
    def max_length(self) -> int:
        return self.model.config.block_size

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def eot_token_id(self) -> int:
        """GPT-2's <|endoftext|>. A char vocabulary has none: its newline (what separates
        documents in a text file) or else token 0 takes its place as the empty context."""
        if self.tokenizer.eot_token is not None:
            return self.tokenizer.eot_token
        chars = getattr(self.tokenizer, "chars", [])
        return chars.index("\n") if "\n" in chars else 0

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name", "char")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)  # GPT-2 adds no BOS: neither does HFLM for it

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    # --- log-likelihoods ---

    @torch.no_grad()
    def _logprobs(self, inputs: list[list[int]]) -> list[torch.Tensor]:
        """Log-softmax over the tokenizer's vocabulary at every position of each input (at most
        block_size tokens), float32, one (len, vocab) tensor per input."""
        width = max(len(i) for i in inputs)
        batch = torch.zeros(len(inputs), width, dtype=torch.long)  # right padding: causal attention never sees it
        for row, ids in enumerate(inputs):
            batch[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        batch = batch.to(self._device)
        with self.autocast():
            # with targets the model returns the logits of every position, not just the last
            logits, _ = self.model(batch, targets=torch.full_like(batch, -1))
        logprobs = F.log_softmax(logits[..., : self.vocab_size].float(), dim=-1)
        return [logprobs[row, : len(ids)] for row, ids in enumerate(inputs)]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) or None, context ids, continuation ids). Returns, in
        the requests' order, (sum of the continuation's log-probabilities, whether every one of
        its tokens is the argmax)."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        # longest first, as HFLM: padding is least, and an out-of-memory comes at the start
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        for start in range(0, len(order), self._batch_size):
            chunk = order[start : start + self._batch_size]
            inputs, continuations = [], []
            for i in chunk:
                _, context, continuation = requests[i]
                if not context or not continuation or len(continuation) > self.max_length:
                    raise ValueError(f"request {i}: an empty context or continuation, or one longer than block_size")
                # the model predicts each token from those before it: it reads all but the last;
                # a sequence too long for block_size loses its oldest context tokens
                inputs.append((context + continuation)[-(self.max_length + 1) :][:-1])
                continuations.append(continuation)
            for i, ids, continuation, logprobs in zip(chunk, inputs, continuations, self._logprobs(inputs)):
                tail = logprobs[len(ids) - len(continuation) :]  # the positions that predict the continuation
                target = torch.tensor(continuation, device=tail.device)
                greedy = bool((tail.argmax(dim=-1) == target).all())
                results[i] = (float(tail.gather(1, target[:, None]).sum()), greedy)
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each request's whole text, scored in block_size windows (lm_eval's rolling windows with
        a context of one token: the end-of-text token before the first)."""
        windows, owners = [], []
        for n, (text,) in enumerate(req.args for req in requests):
            for context, continuation in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(n)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[owner] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # --- generation ---

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """One request at a time, through GPT.generate's KV cache (a batch would need left padding,
        which our attention has no mask for)."""
        eos = self.tok_decode([self.eot_token_id]) if self.tokenizer.eot_token is not None else None
        out = []
        for req in requests:
            context, gen_kwargs = req.args
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = min(int(kwargs.pop("max_gen_toks")), self.max_length - 1)
            # the prompt leaves room for what is generated (HFLM's max_length - max_gen_toks)
            ids = self.tok_encode(context)[-(self.max_length - max_gen_toks) :] or [self.prefix_token_id]
            x = torch.tensor([ids], dtype=torch.long, device=self._device)
            temperature = float(kwargs.get("temperature") or 0.0) if kwargs.get("do_sample") else 0.0

            def written(idx: torch.Tensor) -> bool:
                text = self.tok_decode(idx[0, len(ids) :].tolist())
                return any(stop and stop in text for stop in until)

            with self.autocast():
                y = self.model.generate(x, max_gen_toks, temperature=temperature, top_k=kwargs.get("top_k"),
                                        stop=written)
            text = postprocess_generated_text(self.tok_decode(y[0, len(ids) :].tolist()), until, None)
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return out
