"""The precompute cache: identity and fingerprints, the store, the reader and the builder.

sections.py      section names, labels, shard paths
identity.py      draw/transform versions, model and data identity, section fingerprints
store.py         shard files, manifest, journals, checksums, verification
locks.py         advisory folder locks
reader.py        Cache, open_cache (the trainer's side)
inputs.py        captions and transformed images of the training pairs
plan.py          build options, section layouts, reconciliation with an existing cache
shard_builder.py one rank's shards of each section
ranks.py         process groups, barriers, the build's folder lock
allocator.py     the glibc allocator setting of CPU builds
builder.py       build_cache
cli.py           ``snpo cache``
"""

from snpo.cache.allocator import build_allocator
from snpo.cache.builder import BuildInterrupted, build_cache, epochs_needed
from snpo.cache.identity import data_identity, model_identity, section_fingerprint
from snpo.cache.inputs import captions
from snpo.cache.locks import FolderLocked, exclusive_lock, shared_lock
from snpo.cache.reader import Cache, CachedLatents, open_cache
from snpo.cache.sections import SECTION_LABEL, SECTIONS
from snpo.cache.store import (
    CacheCorruptError,
    CacheError,
    CacheMismatchError,
    crc32,
    diff_fields,
    journal_paths,
    load_manifest,
    merge_parts,
    merged_view,
    row_crcs,
    section_digest,
    sha256_bytes,
    shard_bytes,
    shard_name_problem,
    verify_cache,
    write_shard,
)
from snpo.step import reference_errors

__all__ = [
    "SECTIONS",
    "SECTION_LABEL",
    "BuildInterrupted",
    "Cache",
    "CacheCorruptError",
    "CacheError",
    "CacheMismatchError",
    "CachedLatents",
    "FolderLocked",
    "build_allocator",
    "build_cache",
    "captions",
    "crc32",
    "data_identity",
    "diff_fields",
    "epochs_needed",
    "exclusive_lock",
    "journal_paths",
    "load_manifest",
    "merge_parts",
    "merged_view",
    "model_identity",
    "open_cache",
    "reference_errors",
    "row_crcs",
    "section_digest",
    "section_fingerprint",
    "sha256_bytes",
    "shard_bytes",
    "shard_name_problem",
    "shared_lock",
    "verify_cache",
    "write_shard",
]
