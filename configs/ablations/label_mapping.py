r"""Ablation on the offline proxy task (vpns_jax.ablations): label mapping.

FLM once after the initial mask (released code), ILM (FLM re-made every epoch through the current
prompt, as ILM-VP) or a new head (the classifier replaced by a fresh 10-way layer, trained with the
weights); reference §2. The paper reports no number for this switch.

Argument `mapping=` names the variant (default flm); `vpns_jax.ablations.variants('label_mapping')` lists
them, and an unknown one is a one-line error naming them. Base: VPNs on the quickstart's proxy task
(a width-0.25 ResNet-18 trained here on Fashion-MNIST, digits at 32 px), 8 + 8 epochs, sparsities
0.5 / 0.9 / 0.99.

Commands (one variant; then every variant over seeds 0, 1, 2, and their mean ± std table):
  python -m vpns_jax.main --config configs/ablations/label_mapping.py:mapping=new_head \
      --workdir workdirs/ablations/label_mapping_new_head
  python -m vpns_jax.sweep --sweep configs/sweeps/ablation_label_mapping.py \
      --dir workdirs/sweeps/ablation_label_mapping
  python -m vpns_jax.sweep summarize --dir workdirs/sweeps/ablation_label_mapping
"""

from vpns_jax import ablations


def get_config(arg=None):
    return ablations.get_config('label_mapping', arg)
