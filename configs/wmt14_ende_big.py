"""The paper's big model on WMT14 English-German (Table 2: 28.4 BLEU on newstest2014)."""

from t2t_jax.config import wmt_config


def get_config():
    return wmt_config("wmt14_translate/de-en", big=True)
