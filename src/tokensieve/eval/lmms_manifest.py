"""The ``lmms_eval.models`` entry point of tokensieve.

lmms-eval (>= 0.7) loads every entry point of this group for any ``--model``, and skips the
rest with a warning when one fails, so this module imports nothing but the manifest type; the
model class (and torch, transformers) load only when ``--model tokensieve`` is asked for.
"""

from lmms_eval.models.registry_v2 import ModelManifest

MANIFEST = ModelManifest(
    model_id="tokensieve",
    chat_class_path="tokensieve.eval.lmms_model.TokensieveLMM",
    aliases=("visiontrim",),  # the project's former name
)
