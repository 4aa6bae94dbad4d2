"""Simulated LCO frames with known truth (:mod:`.simulate`) and the demo that runs on them (:mod:`.demo`)."""
