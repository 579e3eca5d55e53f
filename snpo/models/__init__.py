"""Model families (:mod:`snpo.models.family`): loading, prompt encoding and null embeddings,
noising, exports, CFG sampling, LoRA configs, tiny test models."""

from snpo.models.diffusion import DiffusionModel, ModelLoadError, detect_family, load_model
from snpo.models.embeddings import (
    PromptEmbeddings,
    encode_prompts,
    null_embedding,
    unet_conditioning,
)
from snpo.models.export import (
    LORA_FILE,
    META_FILE,
    ExportError,
    load_export,
    load_lora_into,
    read_export_meta,
    write_export,
)
from snpo.models.family import (
    FAMILIES,
    ModelFamily,
    Noised,
    family_of,
    get_family,
    load_families,
    register,
)
from snpo.models.latents import decode_latents, encode_images, sample_latents
from snpo.models.lora import lora_config
from snpo.models.sampler import generate
from snpo.models.sd import elbo_weight, sdxl_time_ids, time_ids, training_target
from snpo.models.tiny import (
    build_scheduler,
    build_text_encoder,
    build_tokenizer,
    build_unet,
    clip_text_config,
    save_model_folder,
    save_tiny_model,
)
from snpo.models.trained import (  # noqa: E402  (uses the names above)
    IncompatibleModelError,
    check_negative_compatible,
    is_deepspeed_checkpoint,
    is_unet_folder,
    load_any,
    null_for,
    resolve_device,
    resolve_dtype,
)

__all__ = [
    "IncompatibleModelError",
    "check_negative_compatible",
    "is_deepspeed_checkpoint",
    "is_unet_folder",
    "load_any",
    "null_for",
    "resolve_device",
    "resolve_dtype",
    "DiffusionModel",
    "ExportError",
    "FAMILIES",
    "LORA_FILE",
    "META_FILE",
    "ModelFamily",
    "ModelLoadError",
    "Noised",
    "PromptEmbeddings",
    "build_scheduler",
    "build_text_encoder",
    "build_tokenizer",
    "build_unet",
    "clip_text_config",
    "decode_latents",
    "detect_family",
    "elbo_weight",
    "encode_images",
    "encode_prompts",
    "family_of",
    "generate",
    "get_family",
    "load_export",
    "load_families",
    "load_lora_into",
    "load_model",
    "lora_config",
    "null_embedding",
    "read_export_meta",
    "register",
    "sample_latents",
    "save_model_folder",
    "save_tiny_model",
    "sdxl_time_ids",
    "time_ids",
    "training_target",
    "unet_conditioning",
    "write_export",
]
