"""Command lines: each module's ``main(argv)`` is a console script (setup.py) and is wrapped by the
script of the same purpose under ``launch/`` or ``tools/``.

| console script | module | wrapper |
|---|---|---|
| ``sampo-train`` | :mod:`.train` | ``launch/pretrain_sampo.py`` |
| ``sampo-convert-hf`` | :mod:`.convert_hf` | ``tools/convert_hf_to_megatron.py`` |
| ``sampo-export-hf`` | :mod:`.export_hf` | ``tools/convert_megatron_to_hf.py`` |
| ``sampo-generate`` | :mod:`.generate` | ``tools/generate.py`` |
| ``sampo-preprocess`` | :mod:`.preprocess` | ``tools/preprocess_preference_data.py`` |
| ``sampo-plan`` | :mod:`.plan` | ``tools/plan_memory.py`` |
"""
