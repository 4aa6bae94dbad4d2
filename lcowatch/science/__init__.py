"""Science steps: pure functions and small types on arrays, headers and their own config section (frame
reading, preprocessing, quality, templates, registration, photometry, calibration, reference catalogs).
They never touch the SQLite state, the intake or the outputs.
"""
