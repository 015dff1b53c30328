"""The paper's base model on WMT14 English-German (Table 2: 27.3 BLEU on newstest2014).

Download once with `t2t-jax prepare --config configs/wmt14_ende_base.py --workdir W`.
"""

from t2t_jax.config import wmt_config


def get_config():
    return wmt_config("wmt14_translate/de-en")
