"""What the master and its workers share: the scoreboard (one shared-memory slot
per worker) and fair share between the workers (balance). Both sides use it, so
it sits below the worker and the master."""
