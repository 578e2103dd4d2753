"""The command tracker's place in the app: started by a router lifespan, reached through a dependency.

The commands router brings this lifespan (FastAPI merges a router's lifespan
into the app's), so the app factory needs no rules-specific lines: the tracker
starts after the app's own start-up (DB migrated, sessions ready) and stops
before its shutdown.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, Request

from device_registry.command_tracker import CommandTracker
from device_registry.notifications_runtime import running_sender
from device_registry.problems import Problem

STATE_ATTR = "command_tracker"


@asynccontextmanager
async def tracker_lifespan(app: FastAPI) -> AsyncIterator[None]:
    state = app.state.registry
    tracker = CommandTracker(state.settings, state.sessions, state.registry)
    sender = running_sender(app)
    if sender is not None:
        tracker.on_notifications = sender.wake
    tracker.fence = state.lease.fence
    tracker.standby_publish = state.broker.publish
    # The object serves every replica's API (a standby records commands, the holder publishes
    # them); its MQTT session and loops run only while this replica holds the lease.

    async def stop(_lost: bool) -> None:
        await tracker.stop()

    state.work.register("command tracker", tracker.start, stop)
    setattr(app.state, STATE_ATTR, tracker)
    try:
        yield
    finally:
        setattr(app.state, STATE_ATTR, None)
        if tracker.running:
            await tracker.stop()


def get_tracker(request: Request) -> CommandTracker:
    tracker: CommandTracker | None = getattr(request.app.state, STATE_ATTR, None)
    if tracker is None:
        raise Problem(503, "the command tracker is not running (registry starting or stopping)")
    return tracker


TrackerDep = Annotated[CommandTracker, Depends(get_tracker)]
