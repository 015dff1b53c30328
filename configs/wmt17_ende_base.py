"""The base model trained on the larger WMT17 English-German set and tested on WMT14's
newstest2014, as the Flax WMT example does."""

from t2t_jax.config import wmt_config


def get_config():
    return wmt_config("wmt17_translate/de-en")
