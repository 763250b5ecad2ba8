"""The paper's claim on data where only memory can help: a short CPU training run on the
synthetic projects of ``synthetic.py`` gives clearly lower loss on far-away name uses when the
model reads the project into its memory than when it does not.

The model has a single attention layer, and it is the memory layer: copying a name seen
earlier can only be learned there, and what its queries and keys learn on nearby copies is what
they then use on the memory.  Training follows the shipped schedule: memory off for the first
half, then on.
"""

from mtlsp_model.model import ModelConfig
from mtlsp_model.train import TrainConfig

from synthetic import far_use_loss, train_on_projects

MODEL = ModelConfig(vocab_size=0, n_layer=1, n_head=2, d_model=64, seq_len=32, mem_layer=0, knn_k=32)
TRAIN = TrainConfig(batch=16, lr=3e-3, warmup_steps=20, max_steps=3000, mem_start=0.5, mem_capacity=512,
                    fim_rate=0.0, eval_every=10**9, ckpt_every=10**9, log_every=500)


def test_memory_lowers_loss_on_far_uses(tmp_path):
    model, tok, _ = train_on_projects(tmp_path, MODEL, TRAIN)
    without = far_use_loss(model, tok, capacity=0)
    with_memory = far_use_loss(model, tok, capacity=TRAIN.mem_capacity)
    print(f"loss on far name uses: {without:.3f} nats without memory, {with_memory:.3f} with")
    assert with_memory < 0.95 * without
