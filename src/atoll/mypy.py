"""A mypy plugin that types refs exactly as they behave.

Enable it in your mypy configuration::

    [tool.mypy]
    plugins = ["atoll.mypy"]

With it:

- ``host.spawn(Cls, *args, **kwargs)`` checks ``args`` and ``kwargs``
  against ``Cls.__init__``, beside spawn's own ``name=`` and ``env=``;
- the ref it returns is an ``ActorRef[Cls]`` whose methods keep ``Cls``'s
  signatures, with the return types a ref really has: an ``async def``
  method is awaited for its result, so is a plain ``def`` method (it runs
  in the actor's worker thread), and an async generator is an async
  iterator;
- refs from :func:`atoll.blocking_host` (``BlockingRef[Cls]``) return plain
  results, and their streams are plain iterators;
- ``atoll.lookup(Cls)`` and ``host.load_extension(path, actor_class=Cls)``
  return ``ActorRef[Cls]`` too.

Without the plugin these calls return the actor class itself, so ``async
def`` methods are checked exactly and plain ones as if they were called
locally.
"""

from __future__ import annotations

from collections.abc import Callable

from mypy.nodes import (
    ARG_NAMED,
    ARG_NAMED_OPT,
    ARG_OPT,
    ARG_POS,
    ARG_STAR,
    ARG_STAR2,
    Decorator,
    FuncDef,
    OverloadedFuncDef,
    TypeInfo,
)
from mypy.plugin import (
    AttributeContext,
    FunctionContext,
    MethodContext,
    MethodSigContext,
    Plugin,
)
from mypy.subtypes import find_member
from mypy.types import (
    AnyType,
    CallableType,
    FunctionLike,
    Instance,
    Type,
    TypeOfAny,
    get_proper_type,
)

_REF = "atoll.actors._ref.ActorRef"
_BLOCKING_REF = "atoll.actors._ref.BlockingRef"
_SPAWNS = {
    "atoll.actors._host.Host.spawn": _REF,
    "atoll.actors._blocking.BlockingHost.spawn": _BLOCKING_REF,
}
_RETURNS_REF = {
    "atoll.actors._host.Host.load_extension": _REF,
    "atoll.actors._blocking.BlockingHost.load_extension": _BLOCKING_REF,
}


class AtollPlugin(Plugin):
    def get_method_signature_hook(
        self, fullname: str
    ) -> Callable[[MethodSigContext], FunctionLike] | None:
        return _spawn_signature if fullname in _SPAWNS else None

    def get_method_hook(self, fullname: str) -> Callable[[MethodContext], Type] | None:
        ref = _SPAWNS.get(fullname) or _RETURNS_REF.get(fullname)
        if ref is None:
            return None
        return lambda ctx: _as_ref(ctx.default_return_type, ref, ctx)

    def get_function_hook(self, fullname: str) -> Callable[[FunctionContext], Type] | None:
        if fullname == "atoll.actors._runtime.lookup":
            return lambda ctx: _as_ref(ctx.default_return_type, _REF, ctx)
        return None

    def get_attribute_hook(self, fullname: str) -> Callable[[AttributeContext], Type] | None:
        # Named after the class that defines __getattr__ (ActorRef), whichever
        # ref it is: the hook tells a BlockingRef by the type it is given.
        if fullname.startswith(_REF + "."):
            name = fullname[len(_REF) + 1 :]
            return lambda ctx: _method_of_ref(ctx, name)
        return None


def _spawn_signature(ctx: MethodSigContext) -> FunctionLike:
    """spawn's signature with the constructor's parameters of the class given."""
    default = ctx.default_signature
    if not ctx.args or not ctx.args[0]:
        return default
    cls_type = get_proper_type(ctx.api.get_expression_type(ctx.args[0][0]))
    if not (isinstance(cls_type, CallableType) and cls_type.is_type_obj()):
        return default  # overloaded constructors, or not a class: checked loosely
    ctor = cls_type
    spawn_params = zip(default.arg_kinds, default.arg_names, default.arg_types, strict=True)
    options = [(k, n, t) for k, n, t in spawn_params if k in (ARG_NAMED, ARG_NAMED_OPT)]
    taken = {name for _, name, _ in options}
    params = list(zip(ctor.arg_kinds, ctor.arg_names, ctor.arg_types, strict=True))
    positional = [p for p in params if p[0] in (ARG_POS, ARG_OPT)]
    star = [p for p in params if p[0] == ARG_STAR]
    named = [p for p in params if p[0] in (ARG_NAMED, ARG_NAMED_OPT) and p[1] not in taken]
    star2 = [p for p in params if p[0] == ARG_STAR2]
    # The class goes positionally first; its constructor's positionals may not
    # be passed by name where spawn takes that name for itself.
    positional = [(k, None if n in taken else n, t) for k, n, t in positional]
    merged = [
        (default.arg_kinds[0], default.arg_names[0], default.arg_types[0]),
        *positional,
        *star,
        *named,
        *options,
        *star2,
    ]
    return default.copy_modified(
        arg_kinds=[k for k, _, _ in merged],
        arg_names=[n for _, n, _ in merged],
        arg_types=[t for _, _, t in merged],
    )


def _as_ref(returned: Type, ref: str, ctx: MethodContext | FunctionContext) -> Type:
    """``A`` or ``Coroutine[Any, Any, A]`` as ``Ref[A]`` (or its coroutine)."""
    proper = get_proper_type(returned)
    if isinstance(proper, Instance) and proper.type.fullname == "typing.Coroutine":
        inner = _as_ref(proper.args[-1], ref, ctx)
        return proper.copy_modified(args=[*proper.args[:-1], inner])
    if isinstance(proper, Instance) and proper.type.fullname not in (_REF, _BLOCKING_REF):
        return _instance(ctx, ref, [proper]) or returned
    return returned


def _instance(ctx: MethodContext | FunctionContext, fullname: str, args: list[Type]) -> Type | None:
    """``fullname[args]``, found among the modules mypy has loaded (atoll's
    package does not import its submodules by name, which mypy's own lookup
    needs)."""
    module, _, name = fullname.rpartition(".")
    loaded = getattr(ctx.api, "modules", {}).get(module)
    symbol = loaded.names.get(name) if loaded is not None else None
    if symbol is None or not isinstance(symbol.node, TypeInfo):
        return None
    return Instance(symbol.node, args)


def _method_of_ref(ctx: AttributeContext, name: str) -> Type:
    ref = get_proper_type(ctx.type)
    if not isinstance(ref, Instance) or not ref.args:
        return ctx.default_attr_type
    blocking = ref.type.has_base(_BLOCKING_REF)
    actor = get_proper_type(ref.args[0])
    if not isinstance(actor, Instance):
        return ctx.default_attr_type  # ActorRef[Any]: anything goes
    symbol = actor.type.get(name)
    node = symbol.node if symbol is not None else None
    if isinstance(node, Decorator):
        node = node.func
    elif isinstance(node, OverloadedFuncDef):
        node = node.items[0].func if isinstance(node.items[0], Decorator) else node.items[0]
    member = find_member(name, actor, actor) if node is not None else None
    proper = get_proper_type(member) if member is not None else None
    if name.startswith("_") or not isinstance(node, FuncDef) or proper is None:
        ctx.api.fail(
            f'Actor "{actor.type.name}" has no public method "{name}" (a ref calls only '
            "its actor's public methods)",
            ctx.context,
        )
        return AnyType(TypeOfAny.from_error)
    if not isinstance(proper, CallableType):
        return proper  # overloaded: as declared
    ret = get_proper_type(proper.ret_type)
    api = ctx.api
    if node.is_async_generator:
        if blocking and isinstance(ret, Instance) and ret.args:
            return proper.copy_modified(
                ret_type=api.named_generic_type("typing.Iterator", [ret.args[0]])
            )
        return proper
    if node.is_coroutine:
        if blocking and isinstance(ret, Instance) and ret.type.fullname == "typing.Coroutine":
            return proper.copy_modified(ret_type=ret.args[-1])
        return proper
    if blocking:
        return proper
    anything = AnyType(TypeOfAny.special_form)
    awaited = api.named_generic_type("typing.Coroutine", [anything, anything, proper.ret_type])
    return proper.copy_modified(ret_type=awaited)


def plugin(version: str) -> type[Plugin]:
    """mypy's entry point."""
    return AtollPlugin
