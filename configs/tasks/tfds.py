"""Task config: instruction tuning on a TFDS dataset by name (``peftjax.data.instructions``).

    python scripts/train.py \
      --config=configs/train.py:model=tiny-llama,method=lora,task=tfds:my_dataset/config \
      --config.task.fields.instruction=question --config.task.fields.input= \
      --config.task.fields.output=answer --workdir=runs/my_tfds

The dataset is stored as array_record and read without TensorFlow; it is prepared on first use
(a catalogue dataset downloads then, once). Split names: ``--config.task.{train,eval,test}_split``.
"""

import ml_collections

from peftjax.data.instructions import task_config


def get_config(name: str = "") -> ml_collections.ConfigDict:
    if not name:
        raise ValueError("the tfds task needs a dataset name: task=tfds:<name>[/<config>]")
    return task_config(f"tfds:{name}", f"tfds:{name}")
