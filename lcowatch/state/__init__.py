"""State: the SQLite ledger of files (:mod:`.ledger`) and the store of frames, templates, stars and points
(:mod:`.store`); the only place with SQL.
"""
