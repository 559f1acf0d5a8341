"""The one label value no loss counts: ``IGNORE_INDEX = -100``.

It is torch's convention (``F.cross_entropy(ignore_index=-100)`` by default) and Hugging Face's (a
label of -100 is skipped by every ``*ForCausalLM`` loss), so batches and checkpoints move between the
two unchanged. The model's loss kernels and the datasets' labels (SFT prompts, DPO prompts, padding)
share this one definition; nothing else defines it.

A stdlib-only leaf below every floor, like ``z2all/atomic.py``: it imports nothing, so the model, the
data package and the training loop may all import it without importing each other.
"""

IGNORE_INDEX = -100
