"""The small synthetic preference world: a CPU-sized text-to-image task with a known
reward, for comparing the preference objectives end to end. Design: docs/world.md.

- :mod:`.vocab`: words, prompts ("a red square on the left"), the train/held-out split, the
  fixed seed list.
- :mod:`.render`: procedural ground truth (3×16×16, jittered) and degradations.
- :mod:`.reward`: the known reward (colour, shape, position, sharpness, clean; fixed weights).
- :mod:`.base_model`: the untrained pixel-space base model folder.
- :mod:`.pickapic`: Pick-a-Pic v2-schema parquet (writer, reader, PNG codec, SFT data).
- :mod:`.pairs`: preference pairs from a model's own CFG samples, ranked by the reward.
- :mod:`.evaluate`: the comparison's fixed evaluation protocol.
- :mod:`.viz`: the reward-validation figure.
- :mod:`.demo`, :mod:`.compare` (with :mod:`.jobs`), :mod:`.assets`: the demo, the comparison of
  every objective, and the shipped base and pairs.

Command line: ``python -m snpo.world
{build-base,sft-data,pairs,evaluate,reward,figure,compare,assets} ...``.
(The functions ``render.render`` and ``reward.reward`` are not re-exported here, so that
``snpo.world.render`` and ``snpo.world.reward`` stay the modules.)
"""

from .base_model import build_base_model_folder, read_world_info
from .evaluate import evaluate_model
from .pairs import generate_pairs, split_prompts_and_seed, write_pairs
from .pickapic import decode_image, encode_png, iter_pairs, read_table, write_sft_parquet
from .render import render_batch
from .reward import WEIGHTS, reward_components
from .vocab import (
    SEEDS,
    WORDS,
    Prompt,
    all_prompts,
    ordered_prompts,
    parse_prompt,
    split_prompts,
)

__all__ = [
    "SEEDS",
    "WEIGHTS",
    "WORDS",
    "Prompt",
    "all_prompts",
    "build_base_model_folder",
    "decode_image",
    "encode_png",
    "evaluate_model",
    "generate_pairs",
    "iter_pairs",
    "ordered_prompts",
    "parse_prompt",
    "read_table",
    "read_world_info",
    "render_batch",
    "reward_components",
    "split_prompts",
    "split_prompts_and_seed",
    "write_pairs",
    "write_sft_parquet",
]
