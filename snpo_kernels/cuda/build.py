"""How the snpo CUDA extension is built: small pure functions plus the two builders.

Importable without torch, nvcc or the package itself: ``setup.py`` loads this file by path
(under pip's build isolation the ``snpo_kernels`` package is not importable there), the JIT
build on first use (:mod:`snpo_kernels.cuda.ops`) and the CPU tests import it normally.
Nothing here runs nvcc; only the builders, when asked to build, hand the sources to torch's
``BuildExtension`` / ``load()``.

Environment:
    SNPO_BUILD_CUDA    0 / 1 / auto (default): skip, force (error when impossible), or build
                       when a CUDA toolkit and a CUDA build of torch are both there.
    SNPO_CUDA_ARCHS    architectures, e.g. "8.0;9.0a" or "sm_80 sm_90a" or "8.0;9.0+PTX".
                       Ahead-of-time build (setup.py): falls back to TORCH_CUDA_ARCH_LIST,
                       then to DEFAULT_ARCHS. JIT build on first use: falls back to the
                       visible GPUs ("native"); TORCH_CUDA_ARCH_LIST is not used there (images
                       often set it for their own torch build, e.g. with 7.0, which nvcc 13
                       rejects). Either way, architectures the installed nvcc does not
                       support (`nvcc --list-gpu-arch`) are dropped with one warning line.
    MAX_JOBS           parallel compile jobs (torch's ninja build; also caps nvcc --threads).
    SNPO_CUDA_JIT      0 disables the JIT build on first use (default 1).
    SNPO_CSRC_DIR      where the JIT build finds csrc/ (default: the source checkout).
    TORCH_EXTENSIONS_DIR  the JIT build cache (torch's default: ~/.cache/torch_extensions).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

BUILD_ENV = "SNPO_BUILD_CUDA"
ARCH_ENV = "SNPO_CUDA_ARCHS"
TORCH_ARCH_ENV = "TORCH_CUDA_ARCH_LIST"
JIT_ENV = "SNPO_CUDA_JIT"
CSRC_ENV = "SNPO_CSRC_DIR"
# sm_80 (A100) and sm_90 (H100/H200) SASS, plus compute_90 PTX that newer GPUs JIT-compile.
# The kernels have no Hopper-only code, so sm_90a is not needed (it is accepted, e.g. "9.0a").
DEFAULT_ARCHS = "8.0;9.0+PTX"
EXTENSION_NAME = "snpo_kernels.cuda._C"  # built by setup.py
JIT_NAME = "snpo_cuda_jit"  # built on first use by torch.utils.cpp_extension.load
SOURCES = ("binding.cpp", "preference_loss_kernels.cu")  # in csrc/
HEADERS = ("preference_loss.h", "pair_math.h")
# The CUDA backend binds the current stream through c10::Stream::native_handle(), which the
# torch headers have since 2.11 (binding.cpp checks the same at compile time).
MIN_TORCH = (2, 11)
# The flags torch's build helpers add to every nvcc call (torch.utils.cpp_extension); the
# compile test uses the same so that it checks what a real build compiles.
TORCH_COMMON_NVCC_FLAGS = (
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
)
INSTALL_HINT = (
    "SNPO_BUILD_CUDA=1 pip install --no-build-isolation -e . (on a machine with nvcc and a "
    "CUDA build of torch)"
)

_TRUE = {"1", "true", "yes", "on", "force"}
_FALSE = {"0", "false", "no", "off", "skip"}
# torch.utils.cpp_extension's named architectures (combined names first).
_NAMED_ARCHS = {
    "ampere+tegra": "8.7",
    "ampere": "8.0;8.6+PTX",
    "ada": "8.9+PTX",
    "hopper": "9.0+PTX",
    "blackwell+tegra": "11.0",
    "blackwell": "10.0;10.3;12.0;12.1+PTX",
    "turing": "7.5+PTX",
}
_ARCH_RE = re.compile(r"^(?:sm_|compute_)?(\d+)(?:\.(\d))?([af]?)(\+ptx)?$", re.IGNORECASE)


class CudaBuildError(RuntimeError):
    """The CUDA build was forced (SNPO_BUILD_CUDA=1) but cannot happen, or a setting is bad."""


# ------------------------------------------------------------------ settings
def build_mode(env: Mapping[str, str]) -> str:
    """SNPO_BUILD_CUDA as "0", "1" or "auto" (unset or empty → "auto")."""
    raw = env.get(BUILD_ENV, "").strip().lower()
    if raw in ("", "auto"):
        return "auto"
    if raw in _TRUE:
        return "1"
    if raw in _FALSE:
        return "0"
    raise CudaBuildError(f"{BUILD_ENV}={env.get(BUILD_ENV)!r} is not one of 0, 1 or auto")


def jit_enabled(env: Mapping[str, str]) -> bool:
    """SNPO_CUDA_JIT (default on): may the extension be compiled on first use?"""
    return env.get(JIT_ENV, "1").strip().lower() not in _FALSE


def max_jobs(env: Mapping[str, str]) -> int | None:
    """MAX_JOBS as a positive int, None when unset; anything else is an error."""
    raw = env.get("MAX_JOBS", "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise CudaBuildError(f"MAX_JOBS={raw!r} must be a positive integer")
    return int(raw)


@dataclass(frozen=True)
class Arch:
    """One target: compute capability major.minor, an optional arch-specific suffix ("a":
    e.g. sm_90a with wgmma/TMA; "f": family), and whether PTX is embedded too."""

    major: int
    minor: int
    suffix: str = ""
    ptx: bool = False

    @property
    def sm(self) -> str:
        return f"{self.major}{self.minor}{self.suffix}"

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}{self.suffix}" + ("+PTX" if self.ptx else "")


def parse_arch_list(text: str, source: str = ARCH_ENV) -> list[Arch]:
    """Parse "8.0;9.0a", "8.0 9.0+PTX", "sm_80,sm_90a", "80;90a" or torch's names ("Hopper").

    Separators: ';', ',' or whitespace. Duplicates are dropped, order kept. "native" cannot
    be parsed here (it needs a GPU): see :func:`native_arch_list`.
    """
    for name, value in _NAMED_ARCHS.items():
        text = re.sub(re.escape(name), value, text, flags=re.IGNORECASE)
    tokens = [t for t in re.split(r"[;,\s]+", text.strip()) if t]
    if not tokens:
        raise CudaBuildError(f"{source} is empty; give e.g. '8.0;9.0' or 'sm_80 sm_90a'")
    archs: list[Arch] = []
    for tok in tokens:
        m = _ARCH_RE.match(tok)
        if m is None or tok.lower() == "native":
            raise CudaBuildError(
                f"cannot parse CUDA architecture {tok!r} in {source}={text!r}; "
                "use forms like 8.0, 9.0a, 9.0+PTX, sm_80 or 90a"
            )
        digits, minor, suffix, ptx = m.groups()
        if minor is None:  # "80", "90a", "100a": the last digit is the minor version
            if len(digits) < 2:
                raise CudaBuildError(f"cannot parse CUDA architecture {tok!r} in {source}")
            major, minor = int(digits[:-1]), int(digits[-1])
        else:
            major, minor = int(digits), int(minor)
        if major < 7:
            raise CudaBuildError(
                f"CUDA architecture {tok!r} in {source} is too old: the kernels target sm_70 "
                "and newer (CUDA 13 itself starts at sm_75)"
            )
        arch = Arch(major, minor, suffix.lower(), bool(ptx))
        if arch not in archs:
            archs.append(arch)
    return archs


def select_arch_list(env: Mapping[str, str], default: str = DEFAULT_ARCHS) -> tuple[str, str]:
    """(arch list text, where it came from): SNPO_CUDA_ARCHS, else TORCH_CUDA_ARCH_LIST, else
    the default."""
    for name in (ARCH_ENV, TORCH_ARCH_ENV):
        value = env.get(name, "").strip()
        if value:
            return value, name
    return default, "default"


def native_arch_list(capabilities: list[tuple[int, int]]) -> str:
    """The arch list for the given device capabilities (the visible GPUs), e.g. "9.0"."""
    if not capabilities:
        raise CudaBuildError("arch list 'native' needs a visible CUDA device")
    return ";".join(sorted({f"{major}.{minor}" for major, minor in capabilities}))


def gencode_flags(archs: list[Arch]) -> list[str]:
    """nvcc -gencode flags: SASS for each arch, plus PTX where "+PTX" was asked for."""
    flags = []
    for a in archs:
        flags.append(f"-gencode=arch=compute_{a.sm},code=sm_{a.sm}")
        if a.ptx:
            flags.append(f"-gencode=arch=compute_{a.sm},code=compute_{a.sm}")
    return flags


def covers(archs: list[Arch], capability: tuple[int, int]) -> bool:
    """Whether code built for ``archs`` can run on a device of ``capability``.

    SASS sm_XY runs on X.Z for Z ≥ Y ("a" variants only on exactly X.Y; "f" on the family);
    PTX compute_XY is JIT-compiled on any newer device (not for "a" variants)."""
    major, minor = capability
    for a in archs:
        if a.suffix == "a":
            if (a.major, a.minor) == (major, minor):
                return True
            continue
        if a.major == major and a.minor <= minor:
            return True
        if a.ptx and (a.major, a.minor) <= (major, minor):
            return True
    return False


def nvcc_supported_archs(
    nvcc: str | None, run: Callable[..., subprocess.CompletedProcess] = subprocess.run
) -> frozenset[tuple[int, int]] | None:
    """The (major, minor) of every ``compute_XY`` that ``nvcc --list-gpu-arch`` names (what
    this nvcc can compile for; "a"/"f" variants count with their base), or None when nvcc is
    absent or too old to say (then nothing is filtered)."""
    if nvcc is None:
        return None
    try:
        res = run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.findall(r"compute_(\d+)(?:[af])?\b", res.stdout or "")
    if res.returncode != 0 or not found:
        return None
    return frozenset((int(d[:-1]), int(d[-1])) for d in found)


def supported_arch_list(
    archs: list[Arch],
    supported: frozenset[tuple[int, int]] | None,
    source: str,
    log: Callable[[str], None] | None = None,
) -> list[Arch]:
    """``archs`` without the ones the installed nvcc cannot compile for, saying so in one
    warning line. A dropped architecture newer than everything nvcc supports is replaced by
    PTX of the newest supported one below it (the driver JIT-compiles that). Raises
    CudaBuildError when nothing is left."""
    if supported is None:
        return list(archs)
    kept: list[Arch] = []
    dropped: list[Arch] = []
    for a in archs:
        if (a.major, a.minor) in supported:
            if a not in kept:
                kept.append(a)
            continue
        dropped.append(a)
        below = [cap for cap in supported if cap < (a.major, a.minor)]
        if (a.major, a.minor) > max(supported) and below:
            ptx = Arch(*max(below), ptx=True)
            if ptx not in kept:
                kept.append(ptx)
    have = ", ".join(f"{m}.{n}" for m, n in sorted(supported))
    if not kept:
        raise CudaBuildError(
            f"none of the CUDA architectures {';'.join(map(str, archs))} ({source}) is "
            f"supported by the installed nvcc (it compiles for {have}); set {ARCH_ENV}"
        )
    if dropped:
        (log or _warn)(
            f"WARNING: dropping CUDA architecture(s) {';'.join(map(str, dropped))} from "
            f"{source}: the installed nvcc does not support them (it compiles for {have}); "
            f"building for {';'.join(map(str, kept))}"
        )
    return kept


def _warn(msg: str) -> None:
    print(f"[snpo] {msg}", file=sys.stderr)


def torch_version_problem(version: str | None) -> str | None:
    """None if this torch can build the CUDA backend, else why not (torch ≥ MIN_TORCH)."""
    if not version:
        return None
    m = re.match(r"(\d+)\.(\d+)", version)
    if m is None or (int(m.group(1)), int(m.group(2))) >= MIN_TORCH:
        return None
    need = ".".join(map(str, MIN_TORCH))
    return (
        f"the CUDA backend needs torch >= {need} (the binding uses c10::Stream::native_handle(), "
        f"new in torch {need}); this torch is {version}: upgrade torch, or use "
        "backend='triton' / 'torch'"
    )


def arch_token(archs: list[Arch]) -> str:
    """The arch list as one identifier (shell- and ninja-safe) for -DSNPO_CUDA_ARCHS=...:
    "8.0;9.0a;9.0+PTX" → "sm80_sm90a_sm90_ptx90". The module exposes it as ``archs``."""
    return "_".join(f"sm{a.sm}" + (f"_ptx{a.sm}" if a.ptx else "") for a in archs)


def parse_arch_token(token: str) -> list[Arch]:
    """Inverse of :func:`arch_token` ([] for an empty or unknown token)."""
    archs: list[Arch] = []
    for kind, digits, suffix in re.findall(r"(sm|ptx)(\d+)([af]?)", token):
        arch = Arch(int(digits[:-1]), int(digits[-1]), suffix)
        if kind == "ptx":
            archs = [Arch(a.major, a.minor, a.suffix, True) if a == arch else a for a in archs]
        elif arch not in archs:
            archs.append(arch)
    return archs


def cxx_flags(archs: list[Arch]) -> list[str]:
    """Flags of our own for binding.cpp: optimisation and the arch list it reports."""
    return ["-O3", f"-DSNPO_CUDA_ARCHS={arch_token(archs)}"]


def nvcc_flags(archs: list[Arch], env: Mapping[str, str]) -> list[str]:
    """Flags of our own for the .cu files (torch adds TORCH_COMMON_NVCC_FLAGS and -std)."""
    targets = len(gencode_flags(archs))
    jobs = max_jobs(env)
    threads = max(1, min(targets, jobs if jobs is not None else (os.cpu_count() or 1)))
    return ["-O3", "-lineinfo", f"--threads={threads}", *gencode_flags(archs)]


# ------------------------------------------------------------------ the decision
def find_nvcc(
    env: Mapping[str, str], which: Callable[[str], str | None] = shutil.which
) -> str | None:
    """The nvcc torch's build helpers would use: $CUDA_HOME or $CUDA_PATH, PATH, then
    /usr/local/cuda. Only looks at files: nvcc is never run."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = env.get(var)
        if home:
            cand = os.path.join(home, "bin", "nvcc")
            return cand if os.path.isfile(cand) else None
    found = which("nvcc")
    if found:
        return found
    cand = "/usr/local/cuda/bin/nvcc"
    return cand if os.path.isfile(cand) else None


def decide_cuda_build(
    env: Mapping[str, str],
    nvcc_path: str | None,
    torch_cuda_version: str | None,
    torch_error: str | None = None,
    torch_version: str | None = None,
) -> tuple[bool, str]:
    """(build the extension?, why) from the settings and what was found.

    torch_cuda_version is ``torch.version.cuda`` (None for a CPU build); torch_error is why
    torch could not be imported in the build environment, if it could not; torch_version is
    ``torch.__version__`` (the binding needs torch >= MIN_TORCH). Raises CudaBuildError when
    SNPO_BUILD_CUDA=1 asks for the impossible.
    """
    mode = build_mode(env)
    if mode == "0":
        return False, f"{BUILD_ENV}=0: the CUDA extension is skipped (plain Python install)"
    problems = []
    if torch_error is not None:
        problems.append(
            f"torch is not importable in the build environment ({torch_error}); pip's build "
            "isolation hides the installed torch, so use `pip install --no-build-isolation`"
        )
    elif torch_cuda_version is None:
        problems.append("the installed torch is a CPU build (torch.version.cuda is None)")
    elif torch_version_problem(torch_version) is not None:
        problems.append(torch_version_problem(torch_version))
    if nvcc_path is None:
        problems.append(
            "no CUDA toolkit found (no nvcc in $CUDA_HOME/bin, on PATH or in /usr/local/cuda/bin)"
        )
    if problems:
        if mode == "1":
            raise CudaBuildError(
                f"{BUILD_ENV}=1 but the CUDA extension cannot be built: "
                + "; ".join(problems)
                + f". Unset {BUILD_ENV} (or set it to 0) for the plain Python install."
            )
        return False, (
            "the CUDA extension is not built (plain Python install; backend='cuda' will JIT-"
            "compile on first use where nvcc and a CUDA torch are present): "
            + "; ".join(problems)
            + f". Set {BUILD_ENV}=1 to make this an error, {BUILD_ENV}=0 to silence it."
        )
    return True, (
        f"building the CUDA extension {EXTENSION_NAME} with {nvcc_path} "
        f"(torch built with CUDA {torch_cuda_version})"
    )


# ------------------------------------------------------------------ setup.py
def setup_kwargs(
    root: str | os.PathLike,
    env: Mapping[str, str] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Extra ``setup()`` arguments: {} for the plain install, else ext_modules + cmdclass.

    Imports torch (only when SNPO_BUILD_CUDA is not 0) but runs no compiler: torch's
    BuildExtension compiles later, in the build_ext step, honouring MAX_JOBS.
    """
    env = os.environ if env is None else env
    log = log or (lambda msg: print(f"[snpo] {msg}", file=sys.stderr))
    mode = build_mode(env)
    if mode == "0":
        log(decide_cuda_build(env, None, None)[1])
        return {}
    torch_cuda, torch_error, torch_version = None, None, None
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as err:  # ImportError under build isolation, or a broken install
        torch_error = f"{type(err).__name__}: {err}"
    else:
        torch_cuda, torch_version = torch.version.cuda, torch.__version__
    nvcc = find_nvcc(env)
    ok, reason = decide_cuda_build(env, nvcc, torch_cuda, torch_error, torch_version)
    log(reason)
    if not ok:
        return {}
    text, source = select_arch_list(env)
    archs = supported_arch_list(
        parse_arch_list(text, source), nvcc_supported_archs(nvcc), source, log
    )
    log(f"CUDA architectures ({source}): {';'.join(str(a) for a in archs)}")
    csrc = Path(root) / "csrc"
    ext = cpp_extension.CUDAExtension(
        name=EXTENSION_NAME,
        sources=[f"csrc/{s}" for s in SOURCES],  # setuptools wants paths relative to setup.py
        include_dirs=[str(csrc.resolve())],
        extra_compile_args={"cxx": cxx_flags(archs), "nvcc": nvcc_flags(archs, env)},
    )
    return {
        "ext_modules": [ext],
        "cmdclass": {"build_ext": make_build_ext(cpp_extension.BuildExtension, mode, log)},
    }


def make_build_ext(base: type, mode: str, log: Callable[[str], None]) -> type:
    """torch's BuildExtension; under SNPO_BUILD_CUDA=auto a failed compile degrades to the
    plain install with a warning (the JIT build stays available), under =1 it is an error."""

    class SnpoBuildExt(base):  # type: ignore[misc, valid-type]
        def run(self) -> None:
            try:
                super().run()
            except Exception as err:
                if mode == "1":
                    raise
                log(
                    f"WARNING: compiling the CUDA extension failed ({type(err).__name__}: "
                    f"{err}); installing without it. Set {BUILD_ENV}=1 to make this fatal."
                )
                self.extensions = []

    return SnpoBuildExt


# ------------------------------------------------------------------ JIT build on first use
def csrc_dir(env: Mapping[str, str] | None = None) -> Path | None:
    """csrc/ with every source, or None: $SNPO_CSRC_DIR, else the source checkout this
    package sits in (an editable install; wheels do not ship csrc/)."""
    env = os.environ if env is None else env
    cands = [Path(env[CSRC_ENV])] if env.get(CSRC_ENV) else []
    cands.append(Path(__file__).resolve().parents[2] / "csrc")
    for cand in cands:
        if all((cand / f).is_file() for f in SOURCES + HEADERS):
            return cand
    return None


def jit_unavailable_reason(
    env: Mapping[str, str],
    torch_cuda_version: str | None,
    nvcc_path: str | None,
    torch_version: str | None = None,
) -> str | None:
    """None if a JIT build can be attempted, else why not (one clause)."""
    if not jit_enabled(env):
        return f"the JIT build is disabled ({JIT_ENV}=0)"
    if torch_cuda_version is None:
        return "no JIT build possible: the installed torch is a CPU build"
    too_old = torch_version_problem(torch_version)
    if too_old is not None:
        return f"no JIT build possible: {too_old}"
    if nvcc_path is None:
        return "no JIT build possible: nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    if csrc_dir(env) is None:
        return (
            f"no JIT build possible: the csrc/ sources are not here (set {CSRC_ENV} to a "
            "checkout's csrc/ or install from a source checkout)"
        )
    return None


def jit_arch_list(
    env: Mapping[str, str],
    capabilities: list[tuple[int, int]],
    supported: frozenset[tuple[int, int]] | None = None,
    log: Callable[[str], None] | None = None,
) -> list[Arch]:
    """SNPO_CUDA_ARCHS when set (and not "native"), else the visible devices' own
    architectures; TORCH_CUDA_ARCH_LIST is ignored here (module docstring). Then without
    what the installed nvcc does not support (``supported``, see :func:`supported_arch_list`)."""
    text, source = env.get(ARCH_ENV, "").strip(), ARCH_ENV
    if not text or text.lower() == "native":
        text, source = native_arch_list(capabilities), "the visible devices"
    return supported_arch_list(parse_arch_list(text, source), supported, source, log)


def jit_build(verbose: bool = False, env: Mapping[str, str] | None = None):
    """Compile csrc/ with torch.utils.cpp_extension.load (cached in TORCH_EXTENSIONS_DIR,
    rebuilt only when a source or flag changes) and return the loaded module."""
    import torch
    from torch.utils.cpp_extension import load

    env = os.environ if env is None else env
    src = csrc_dir(env)
    if src is None:
        raise CudaBuildError(jit_unavailable_reason(env, "?", "?") or "csrc/ not found")
    caps = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    from torch.utils import cpp_extension

    home = getattr(cpp_extension, "CUDA_HOME", None)  # the toolkit load() will compile with
    nvcc = os.path.join(home, "bin", "nvcc") if home else find_nvcc(env)
    archs = jit_arch_list(env, caps, nvcc_supported_archs(nvcc))
    return load(
        name=JIT_NAME,
        sources=[str(src / s) for s in SOURCES],
        extra_include_paths=[str(src)],
        extra_cflags=cxx_flags(archs),
        extra_cuda_cflags=nvcc_flags(archs, env),
        verbose=verbose,
    )
