"""Outputs: light-curve tables and AAVSO files (:mod:`.export`) and plots (:mod:`.plot`)."""
