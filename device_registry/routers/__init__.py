"""API routers, one module per resource.

``device_registry.main.create_app`` includes every module of this package that
defines ``router`` (an ``APIRouter``), so a new resource is one new file here;
routes under ``/api/v1`` set ``prefix="/api/v1/..."`` on their router and use
the dependency aliases of ``device_registry.deps`` for the session and the role.
"""
