"""Intake: files arriving in watched folders, until they are complete and queued (watching, readiness,
quarantine, discovery) and the daemon that runs it all.
"""
