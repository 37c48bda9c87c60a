"""Tests against real processes on this machine (Prefect servers, subprocesses, venvs): no root,
no sandbox."""
