"""Write a test doctor for SmolLM2-135M-Instruct: a random rank-1 LoRA adapter on the last
layer's down_proj, in PEFT's safetensors layout, with its doctor.toml.

Usage: python3 make_doctor.py DOCTORS_DIR NAME
"""

import json
import random
import struct
import sys
from pathlib import Path

# SmolLM2-135M-Instruct's shape (its config.json): 30 layers, hidden 576, MLP width 1536.
NUM_LAYERS = 30
HIDDEN_SIZE = 576
INTERMEDIATE_SIZE = 1536


def write_safetensors(path, tensors):
    """Write float32 tensors given as (shape, flat list) in the safetensors format."""
    header = {}
    offset = 0
    blobs = []
    for name, (shape, values) in tensors.items():
        blob = struct.pack(f"<{len(values)}f", *values)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)


def main():
    doctors, name = Path(sys.argv[1]), sys.argv[2]
    folder = doctors / name
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(11)
    prefix = f"base_model.model.model.layers.{NUM_LAYERS - 1}.mlp.down_proj"
    write_safetensors(
        folder / "adapter.safetensors",
        {
            f"{prefix}.lora_A.weight": ((1, INTERMEDIATE_SIZE), [rng.uniform(-1, 1) for _ in range(INTERMEDIATE_SIZE)]),
            f"{prefix}.lora_B.weight": ((HIDDEN_SIZE, 1), [rng.uniform(-4, 4) for _ in range(HIDDEN_SIZE)]),
        },
    )
    (folder / "adapter_config.json").write_text(
        json.dumps({"r": 1, "lora_alpha": 1.0, "target_modules": ["down_proj"], "peft_type": "LORA"})
    )
    (folder / "doctor.toml").write_text(
        f'name = "{name}"\ndescription = "random test doctor"\nbase = "patient"\ndefault_beta = 1.0\n'
    )


if __name__ == "__main__":
    main()
