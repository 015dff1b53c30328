"""A 1.5B-parameter model of the same code on WMT14 English-German, for pods: too big to train
unsharded on a 16 GiB chip.

d_model 2048, d_ff 8192, 32 heads (d_k 64 as in the paper), 12+12 layers, shared 37,000-token
vocabulary: 1,486M parameters, whose float32 params, gradients and Adam moments alone take
22 GiB. The paper's recipe otherwise (big model's P_drop 0.3, packed 256-token rows). See
docs/tpu.md for the meshes it fits under.
"""

from t2t_jax.config import wmt_config


def get_config():
    config = wmt_config("wmt14_translate/de-en", big=True)
    config.model.d_model = 2048
    config.model.d_ff = 8192
    config.model.num_heads = 32
    config.model.num_encoder_layers = 12
    config.model.num_decoder_layers = 12
    # Its training state does not fit one 16 GiB chip: shard it over each slice's (or host's)
    # chips, data parallel across slices (docs/tpu.md compares the meshes).
    config.mesh.ici.update(data=1, fsdp=-1, tensor=1)
    return config
