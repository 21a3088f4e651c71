"""The store: database models (jobs, deliveries, reads and verdicts, scheduler runs), queue transitions,
verdict rules, migrations and the spool. Imports config only (of our packages)."""
