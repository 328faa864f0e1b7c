"""The process model: the master, its worker processes, the scoreboard, control, systemd."""
