"""What every process sets up the same way: the launcher's variables (:mod:`.launch_env`), process
groups and megatron-core's parallel state (:mod:`.distributed`), the model, optimizer and schedule
builders (:mod:`.builders`), checkpoints (:mod:`.checkpointing`) and the checks that a closed run left
nothing behind (:mod:`.leftovers`)."""
