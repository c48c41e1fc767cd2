"""The protocol steps an engine may run at a client besides training and evaluation: bytes in, bytes out.

Named here, apart from the App and the engines, so that an engine can check a request without importing the
client code. The App answers each through the feature that owns it (``App.call``).
"""

SECAGG_STEPS = ("secagg_advertise", "secagg_share_keys", "secagg_receive_shares", "secagg_unmask")
FISHER = "continual_fisher"
CLASS_STATS = "ccvr_class_stats"
PERSONALIZE = "personalize"
PROTOCOL_FUNCTIONS = (*SECAGG_STEPS, FISHER, CLASS_STATS, PERSONALIZE)
