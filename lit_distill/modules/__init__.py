"""LightningModules for the ways one LLM trains another, over two bases.

``CausalLMModule`` (causal_lm.py) trains one model on next tokens: the shift, optimizers, token-exact
normalization (normalization.py), validation, export and checkpoint checks. ``DistillationModule``
(distillation.py) adds the teacher, frozen or trained, and the fused loss call. Each technique overrides
``compute_loss``. ``OfflineDistillation`` (offline.py) has no teacher: it reads a teacher cache's signal.
``OnPolicyDistillation`` (on_policy.py) trains on the student's own samples (generation.py), scored by the teacher
(sampled_token.py: the estimator that reads only the sampled tokens).
"""

from .causal_lm import CausalLMModule
from .co_distillation import CoDistillation
from .cross_tokenizer import CrossTokenizerDistillation
from .cross_tokenizer_on_policy import CrossTokenizerOnPolicy
from .distillation import DistillationModule
from .hard_label import HardLabelDistillation
from .language_model import LanguageModelTraining
from .offline import OfflineDistillation
from .on_policy import OnPolicyDistillation
from .soft_label import SoftLabelDistillation

__all__ = [
    "CausalLMModule",
    "CoDistillation",
    "CrossTokenizerDistillation",
    "CrossTokenizerOnPolicy",
    "DistillationModule",
    "HardLabelDistillation",
    "LanguageModelTraining",
    "OfflineDistillation",
    "OnPolicyDistillation",
    "SoftLabelDistillation",
]
