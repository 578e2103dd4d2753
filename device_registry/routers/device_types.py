"""Device types from the catalogue, with the JSON schemas of their readings and commands."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from device_registry.deps import CurrentViewer
from device_registry.problems import PROBLEM_RESPONSES, NotFound
from device_registry.schemas import DeviceTypeList, DeviceTypeRead, DeviceTypeSummary
from iotfleet.catalogue import DEVICE_TYPES

router = APIRouter(prefix="/api/v1/device-types", tags=["device types"], responses=PROBLEM_RESPONSES)


@router.get("", summary="List device types")
async def list_device_types(_caller: CurrentViewer) -> DeviceTypeList:
    return DeviceTypeList(
        items=[
            DeviceTypeSummary(
                name=t.name,
                description=t.description,
                fields=list(t.fields),
                units=dict(t.units),
                commands=list(t.commands),
            )
            for t in DEVICE_TYPES.values()
        ]
    )


@router.get("/{type_name}", summary="A device type's reading and command JSON schemas", responses={404: {}})
async def get_device_type(
    type_name: Annotated[str, Path(max_length=64)], _caller: CurrentViewer
) -> DeviceTypeRead:
    device_type = DEVICE_TYPES.get(type_name)
    if device_type is None:
        raise NotFound("device type", type_name)
    return DeviceTypeRead(**device_type.schema())
