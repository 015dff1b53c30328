"""The reverse task for the decoder-only language model: `3 1 4 <eos> 4 1 3 <eos>` as one
sequence, with the loss on the part after the first EOS only."""

from t2t_jax.config import small_task_config


def get_config():
    config = small_task_config("reverse")
    config.model.type = "decoder_only"
    config.model.num_decoder_layers = 4  # the encoder's share of depth moves to the decoder
    config.train.num_steps = 3000
    return config
