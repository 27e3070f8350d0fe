"""Plain causal-LM training: pretraining a teacher, or a student trained alone as the baseline."""

from __future__ import annotations

from .causal_lm import CausalLMModule


class LanguageModelTraining(CausalLMModule):
    """Next-token cross-entropy of one model, no teacher.

    Shares the distillation modules' batches, token-exact normalization, logging and export, so a
    student trained alone is a like-for-like baseline. Arguments as in
    :class:`~lit_distill.modules.causal_lm.CausalLMModule` (``loss`` only supplies ``ignore_index``).

    Example:
        >>> module = LanguageModelTraining(CausalLM(config={...}), optimizer=partial(torch.optim.AdamW, lr=3e-3))
        >>> Trainer(max_steps=1000).fit(module, TextDataModule())
    """
