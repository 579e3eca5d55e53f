"""Reward models of the papers' tables, loaded from local paths or hub ids (optional extras).

| metric | what it is | needs | reported as |
| --- | --- | --- | --- |
| PickScore | CLIP-H fine-tuned on Pick-a-Pic | transformers; ``--pickscore-model`` (default ``yuvalkirstain/PickScore_v1``) and ``--pickscore-processor`` (default ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``) | logit_scale·cos(image, text) (≈ 20–23 for SD1.5/SDXL) |
| HPSv2 | open_clip ViT-H-14 fine-tuned on HPD v2 | ``pip install hpsv2`` (or ``open_clip_torch``) and ``--hps-checkpoint`` (``HPS_v2.1_compressed.pt`` or a ``.safetensors`` copy) | 100·cos(image, text) (≈ 26–28) |
| ImageReward | BLIP-based reward model | ``pip install image-reward``, ``--imagereward-checkpoint`` (``ImageReward.pt``) and ``--imagereward-med-config`` (``med_config.json``); BLIP also loads the ``bert-base-uncased`` tokenizer from the HF cache | the model's score (≈ 0.1–1) |
| Aesthetic | LAION aesthetic predictor: a head on the L2-normalised CLIP ViT-L/14 image embedding | transformers; ``--aesthetic-head`` (``sac+logos+ava1-l14-linearMSE.pth``, or the linear v1 head) and ``--aesthetic-clip`` (default ``openai/clip-vit-large-patch14``) | the head's output (≈ 5–6) |

Every scorer has ``score(images: list[PIL.Image], prompts: list[str]) -> list[float]``. A missing
package or weight file raises :class:`RewardError` naming what to install or pass. Nothing is
downloaded unless a hub id is given and the hub is reachable (check what you load offline:
``HF_HUB_OFFLINE=1`` can yield a placeholder tokenizer, which is refused here). Torch
checkpoints are read with ``weights_only=True``; one that pickles anything else is refused
unless ``--trust-pickle`` is given (see :func:`load_weights`).
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path

import torch

METRICS = ("pickscore", "hpsv2", "imagereward", "aesthetic")  # the table's column order
DISPLAY = {
    "pickscore": "PickScore",
    "hpsv2": "HPSv2",
    "imagereward": "ImageReward",
    "aesthetic": "Aesthetic",
}
PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
AESTHETIC_CLIP = "openai/clip-vit-large-patch14"
HPS_ARCH = "ViT-H-14"


class RewardError(RuntimeError):
    """A reward model cannot be loaded (missing package or weights) or used."""


def _check_tokenizer(tokenizer, where: str) -> None:
    n = len(tokenizer)
    ids = tokenizer("a red cube", add_special_tokens=False).input_ids
    if n < 8 or len(set(ids)) < 2:
        raise RewardError(
            f"{where}: the tokenizer looks degenerate (vocabulary of {n}); with HF_HUB_OFFLINE=1 "
            "transformers can return a placeholder. Point to a complete local copy."
        )


def _load_clip(model: str, processor: str | None, device: str, dtype: torch.dtype, what: str):
    from transformers import CLIPModel, CLIPProcessor

    try:
        proc = CLIPProcessor.from_pretrained(processor or model)
        clip = CLIPModel.from_pretrained(model, torch_dtype=dtype)
    except (OSError, ValueError) as err:
        raise RewardError(
            f"{what}: cannot load the CLIP model {model!r} / processor {processor or model!r}: "
            f"{err}. Give local folders (see `snpo eval --help`)."
        ) from err
    _check_tokenizer(proc.tokenizer, what)
    return clip.to(device).eval().requires_grad_(False), proc


def _image_embeds(clip, proc, images, device) -> torch.Tensor:
    pix = proc(images=list(images), return_tensors="pt")["pixel_values"]
    pix = pix.to(device=device, dtype=clip.visual_projection.weight.dtype)
    out = clip.visual_projection(clip.vision_model(pixel_values=pix).pooler_output)
    return torch.nn.functional.normalize(out.float(), dim=-1)


def _text_embeds(clip, proc, prompts, device) -> torch.Tensor:
    tok = proc.tokenizer
    enc = tok(
        list(prompts),
        padding=True,
        truncation=True,
        max_length=tok.model_max_length,
        return_tensors="pt",
    )
    out = clip.text_model(
        input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device)
    ).pooler_output
    return torch.nn.functional.normalize(clip.text_projection(out).float(), dim=-1)


class PickScore:
    """PickScore: logit_scale · cos(image embedding, text embedding) of the PickScore CLIP."""

    name = "pickscore"

    def __init__(
        self,
        model: str = PICKSCORE_MODEL,
        processor: str | None = PICKSCORE_PROCESSOR,
        *,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.device = device
        self.clip, self.proc = _load_clip(model, processor, device, dtype, "PickScore")

    @torch.no_grad()
    def score(self, images, prompts) -> list[float]:
        img = _image_embeds(self.clip, self.proc, images, self.device)
        txt = _text_embeds(self.clip, self.proc, prompts, self.device)
        scale = self.clip.logit_scale.float().exp()
        return (scale * (img * txt).sum(-1)).cpu().tolist()


def aesthetic_head(state: dict[str, torch.Tensor]) -> torch.nn.Sequential:
    """The LAION aesthetic head from its state dict: v2 (``layers.{0,2,4,6,7}``: a stack of
    Linear layers whose ReLUs are commented out in the original, dropout between) or v1 (one
    Linear: ``weight``, ``bias``). Applied to the L2-normalised CLIP image embedding."""
    if set(state) == {"weight", "bias"}:
        state = {"layers.0.weight": state["weight"], "layers.0.bias": state["bias"]}
    idx = set()
    for k in state:
        m = re.fullmatch(r"(?:layers\.)?(\d+)\.(weight|bias)", k)
        if not m:
            raise RewardError(
                f"aesthetic head: unexpected key {k!r} (a LAION predictor state dict?)"
            )
        idx.add(int(m.group(1)))
    layers = []
    prefix = "layers." if any(k.startswith("layers.") for k in state) else ""
    for i in sorted(idx):
        w, b = state[f"{prefix}{i}.weight"], state.get(f"{prefix}{i}.bias")
        if w.ndim != 2:
            raise RewardError(f"aesthetic head: layer {i} is not linear (shape {tuple(w.shape)})")
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
        with torch.no_grad():
            lin.weight.copy_(w)
            if b is not None:
                lin.bias.copy_(b)
        layers.append(lin)
    for a, b in zip(layers, layers[1:]):
        if a.out_features != b.in_features:
            raise RewardError("aesthetic head: consecutive layers do not chain")
    if layers[-1].out_features != 1:
        raise RewardError("aesthetic head: the last layer must have one output")
    return torch.nn.Sequential(*layers).eval().requires_grad_(False)


def _unpickle_reason(err: Exception) -> str:
    """The line of torch's weights-only error that names what was refused."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for ln in lines:
        if "WeightsUnpickler error" in ln or "Unsupported global" in ln:
            return ln.split("Please use")[0].strip()
    return lines[0] if lines else type(err).__name__


def load_weights(path: str, what: str, *, trust_pickle: bool = False):
    """Tensors (or plain containers of them) from a ``.safetensors`` file or a torch ``.pt``.

    A ``.pt`` is read with ``torch.load(weights_only=True)``: only tensors, numbers, strings and
    plain containers, no code. That covers the published checkpoints (HPS v2/v2.1: an open_clip
    training checkpoint ``{"state_dict": OrderedDict[str, Tensor], "epoch": int, "name": str}``;
    the LAION aesthetic heads: a state dict), so no extra type is allow-listed. A file that
    needs anything else is refused (:class:`RewardError` naming ``--trust-pickle``) unless
    ``trust_pickle`` is set: then it is unpickled in full, which runs whatever code it holds.
    """
    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except Exception as err:  # noqa: BLE001 - safetensors raises several kinds
            raise RewardError(f"{what}: cannot read {path}: {err}") from err
    try:
        return torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not trust_pickle:
            raise RewardError(
                f"{what}: {path} holds pickled objects besides tensors and plain containers, "
                "and unpickling them could run code from the file; it was not loaded. Convert it "
                "once to .safetensors (or a plain state dict), or pass --trust-pickle if you "
                f"trust where it came from ({_unpickle_reason(err)})"
            ) from err
        detail = err
    except Exception as err:  # noqa: BLE001 - a corrupt file raises several kinds
        raise RewardError(f"{what}: cannot read {path}: {err}") from err
    warnings.warn(
        f"{what}: unpickling {path} in full (--trust-pickle): {_unpickle_reason(detail)}",
        stacklevel=2,
    )
    return torch.load(str(p), map_location="cpu", weights_only=False)


def _load_state(path: str, *, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise RewardError(
            f"aesthetic head {path!r} not found: pass --aesthetic-head PATH (the LAION predictor "
            "sac+logos+ava1-l14-linearMSE.pth, or a .safetensors copy)"
        )
    state = load_weights(path, "aesthetic head", trust_pickle=trust_pickle)
    return state.get("state_dict", state) if isinstance(state, dict) else state


class Aesthetic:
    """LAION aesthetic score: head(normalize(CLIP ViT-L/14 image embedding))."""

    name = "aesthetic"

    def __init__(
        self,
        head: str | None,
        clip: str = AESTHETIC_CLIP,
        *,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        trust_pickle: bool = False,
    ) -> None:
        if head is None:
            raise RewardError(
                "Aesthetic needs the LAION predictor head: --aesthetic-head PATH "
                "(sac+logos+ava1-l14-linearMSE.pth) and a CLIP ViT-L/14 (--aesthetic-clip)"
            )
        self.device = device
        self.head = aesthetic_head(_load_state(head, trust_pickle=trust_pickle)).to(device)
        self.clip, self.proc = _load_clip(clip, None, device, dtype, "Aesthetic")
        dim = self.clip.config.projection_dim
        if self.head[0].in_features != dim:
            raise RewardError(
                f"aesthetic head expects {self.head[0].in_features}-d embeddings but the CLIP "
                f"model gives {dim}-d (the LAION head goes with CLIP ViT-L/14, 768-d)"
            )

    @torch.no_grad()
    def score(self, images, prompts=None) -> list[float]:
        emb = _image_embeds(self.clip, self.proc, images, self.device)
        return self.head(emb).squeeze(-1).cpu().tolist()


def _open_clip():
    try:
        import open_clip

        return open_clip
    except ImportError:
        pass
    try:
        from hpsv2.src import open_clip  # the copy bundled with the hpsv2 package

        return open_clip
    except ImportError as err:
        raise RewardError(
            "HPSv2 needs `pip install hpsv2` (or `pip install open_clip_torch`) and its "
            "checkpoint (--hps-checkpoint PATH, e.g. HPS_v2.1_compressed.pt)"
        ) from err


class HPSv2:
    """HPS v2 / v2.1: 100 · cos(image, text) of the HPS-fine-tuned open_clip ViT-H-14."""

    name = "hpsv2"

    def __init__(
        self,
        checkpoint: str | None,
        *,
        arch: str = HPS_ARCH,
        device: str = "cpu",
        trust_pickle: bool = False,
    ) -> None:
        """``checkpoint``: ``.pt`` (read with ``weights_only=True``; see :func:`load_weights`) or
        ``.safetensors``; ``trust_pickle`` allows a full unpickle (runs the file's code)."""
        oc = _open_clip()
        if checkpoint is None or not Path(checkpoint).is_file():
            raise RewardError(
                "HPSv2 needs its checkpoint: --hps-checkpoint PATH (HPS_v2.1_compressed.pt or "
                f"HPS_v2_compressed.pt){'' if checkpoint is None else f'; {checkpoint} not found'}"
            )
        model, _, preprocess = oc.create_model_and_transforms(arch, pretrained=None, device="cpu")
        ckpt = load_weights(checkpoint, "HPSv2", trust_pickle=trust_pickle)
        state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise RewardError(f"HPSv2: {checkpoint} does not fit open_clip {arch}: {err}") from err
        self.model = model.to(device).eval().requires_grad_(False)
        self.preprocess = preprocess
        self.tokenizer = oc.get_tokenizer(arch)
        self.device = device

    @torch.no_grad()
    def score(self, images, prompts) -> list[float]:
        pix = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        txt = self.tokenizer(list(prompts)).to(self.device)
        img = torch.nn.functional.normalize(self.model.encode_image(pix).float(), dim=-1)
        tx = torch.nn.functional.normalize(self.model.encode_text(txt).float(), dim=-1)
        return (100.0 * (img * tx).sum(-1)).cpu().tolist()


class ImageRewardScorer:
    """ImageReward (Xu et al. 2023) through its package."""

    name = "imagereward"

    def __init__(
        self, checkpoint: str | None, med_config: str | None = None, *, device: str = "cpu"
    ) -> None:
        msg = (
            "ImageReward needs `pip install image-reward` and its checkpoint "
            "(--imagereward-checkpoint PATH to ImageReward.pt, --imagereward-med-config PATH to "
            "med_config.json); its BLIP text encoder also loads the bert-base-uncased tokenizer "
            "from the Hugging Face cache"
        )
        try:
            import ImageReward as RM  # noqa: N814 - the package's own name
        except ImportError as err:
            raise RewardError(msg) from err
        if checkpoint is None:
            raise RewardError(msg)
        try:
            self.model = RM.load(checkpoint, device=device, med_config=med_config)
        except Exception as err:  # noqa: BLE001 - the package raises many kinds
            raise RewardError(f"ImageReward: cannot load {checkpoint!r}: {err}. {msg}") from err

    @torch.no_grad()
    def score(self, images, prompts) -> list[float]:
        out = []
        for im, p in zip(images, prompts):
            s = self.model.score(p, [im])
            out.append(float(s[0] if isinstance(s, (list, tuple)) else s))
        return out


def build_scorers(names: list[str], opts: dict, *, device: str = "cpu") -> dict:
    """Scorers for ``names`` (subset of METRICS) from ``opts`` (the CLI's reward options;
    ``trust_pickle``: allow a full unpickle of the HPSv2 checkpoint / aesthetic head)."""
    bad = [n for n in names if n not in METRICS]
    if bad:
        raise RewardError(f"unknown reward(s) {bad}; choose from {', '.join(METRICS)}")
    trust = bool(opts.get("trust_pickle", False))
    out = {}
    for n in names:
        if n == "pickscore":
            out[n] = PickScore(
                opts.get("pickscore_model") or PICKSCORE_MODEL,
                opts.get("pickscore_processor")
                or opts.get("pickscore_model")
                or PICKSCORE_PROCESSOR,
                device=device,
            )
        elif n == "aesthetic":
            out[n] = Aesthetic(
                opts.get("aesthetic_head"),
                opts.get("aesthetic_clip") or AESTHETIC_CLIP,
                device=device,
                trust_pickle=trust,
            )
        elif n == "hpsv2":
            out[n] = HPSv2(opts.get("hps_checkpoint"), device=device, trust_pickle=trust)
        else:
            out[n] = ImageRewardScorer(
                opts.get("imagereward_checkpoint"),
                opts.get("imagereward_med_config"),
                device=device,
            )
    return out
