"""Dropping privileges in a worker after the master has bound its sockets."""

from __future__ import annotations

import grp
import os
import pwd

from octopus.errors import ConfigError, OctopusError


def resolve_user(user: str | int) -> pwd.struct_passwd:
    try:
        return pwd.getpwuid(user) if isinstance(user, int) else pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(f"user: no such user {user!r}") from None


def resolve_group(group: str | int) -> int:
    try:
        return group if isinstance(group, int) else grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"group: no such group {group!r}") from None


def check(user: str | int | None, group: str | int | None) -> None:
    """Fail early, in the master, on a user or group that does not exist."""
    if user is not None:
        resolve_user(user)
    if group is not None:
        resolve_group(group)


def drop(user: str | int | None, group: str | int | None, umask: int | None) -> None:
    """Switch this process to ``user``/``group`` and set ``umask``.

    The group goes first: once the uid is no longer 0 the process may not
    change its gid any more.
    """
    if umask is not None:
        os.umask(umask)
    if user is None and group is None:
        return
    account = resolve_user(user) if user is not None else None
    gid = resolve_group(group) if group is not None else (account.pw_gid if account else None)
    try:
        if gid is not None and gid != os.getegid():
            os.setgroups([gid])
            os.setgid(gid)
        if account is not None and account.pw_uid != os.geteuid():
            os.initgroups(account.pw_name, gid if gid is not None else account.pw_gid)
            os.setuid(account.pw_uid)
    except PermissionError as exc:
        raise OctopusError(f"cannot switch to user {user!r} group {group!r}: {exc.strerror}"
                           ) from None
