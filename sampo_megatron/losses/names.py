"""The names the loss and length-debias registries hold, readable without importing torch: flag
parsing and ``--help`` answer before torch loads.

pairwise.py and debias.py register exactly these names: registering one that is not listed here
fails at import, and so does leaving one of them unregistered (:meth:`.registry.Registry.check_complete`).
"""

LOSS_TYPES = ("bco_pair", "dpop", "hinge", "ipo", "kto_pair", "nca_pair", "orpo", "rdpo", "robust", "sft", "sigmoid",
              "sigmoid_norm", "simpo", "sppo_hard", "tdpo1", "tdpo2")  # fmt: skip
"""``--loss-type`` (losses/pairwise.py)."""
LENGTH_DEBIAS = ("ld_dpo", "none", "sampo", "sampo_topk", "sanorm")
"""``--length-debias`` (losses/debias.py)."""
