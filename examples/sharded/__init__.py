"""Sharded LoRA-Pro fine-tuning on a device mesh (FSDP and data parallelism).

``model`` holds the network and its partition specs, ``train`` the optimizer,
the jitted train step and the checkpoint, ``finetune`` the command line.
"""
