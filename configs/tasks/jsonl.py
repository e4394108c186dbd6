"""Task config: instruction tuning on your own JSONL data (``peftjax.data.instructions``).

    python scripts/train.py \
      --config=configs/train.py:model=tiny-llama,method=lora,task=jsonl:/data/alpaca.jsonl \
      --workdir=runs/my_instructions

One JSON object a line: {"instruction": ..., "input": ... (optional), "output": ...}; other field
names through ``--config.task.fields.instruction=prompt`` etc. A single file is split 90/5/5 by
content hash (``--config.task.split_fractions.*``); a directory is read as
``<dir>/{train,validation,test}.jsonl``. Alpaca's prompt template by default
(``--config.task.prompt_template`` / ``prompt_template_no_input``).
"""

import ml_collections

from peftjax.data.instructions import task_config


def get_config(path: str = "") -> ml_collections.ConfigDict:
    if not path:
        raise ValueError("the jsonl task needs a path: task=jsonl:/path/file.jsonl (or a directory)")
    return task_config(f"jsonl:{path}", f"jsonl:{path}")
