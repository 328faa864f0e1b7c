"""The master's parts: worker processes and the forked side, control socket, metrics and
/health, daemon, pidfile, privileges, systemd, signals."""
