"""vfmctl entry point: parse the command line, call libvfm, print, exit with a meaningful code."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc

from libvfm import Client, Quota, TokenLimits
from libvfm.errors import NotFound, VfmError
from libvfm.paths import KERNEL_SOCKET, default_state_dir, kernel_socket
from libvfm.types import AskResult
from vfmctl import daemons, knowledge, models, output, routing, trust

EXIT_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT: 2, grpc.StatusCode.NOT_FOUND: 3,
    grpc.StatusCode.PERMISSION_DENIED: 4, grpc.StatusCode.UNAUTHENTICATED: 4,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 5, grpc.StatusCode.UNAVAILABLE: 6,
    grpc.StatusCode.FAILED_PRECONDITION: 7,
}
EPILOG = """exit codes: 0 ok, 1 other error, 2 bad input, 3 not found, 4 not allowed,
5 quota exhausted, 6 daemon unavailable, 7 wrong process state, 130 interrupted.
The kernel is found through --socket, else $VFM_SOCKET, else $VFM_STATE_DIR/vfmd.sock,
else the default state dir (/run/vfmos for root, $XDG_RUNTIME_DIR/vfmos otherwise).
Remote kernels: --target HOST:PORT with --token (or $VFM_TOKEN)."""


def _state_dir(args) -> Path:
    return args.state_dir or default_state_dir()


def _client(args) -> Client:
    target = args.target or os.environ.get("VFM_TARGET")
    if target:
        token = args.token or os.environ.get("VFM_TOKEN")
        ca = Path(args.tls_ca).read_bytes() if args.tls_ca else None
        return Client(target=target, token=token, tls_ca=ca)
    if args.socket:
        return Client(args.socket)
    if args.state_dir:
        return Client(args.state_dir / KERNEL_SOCKET)
    return Client(kernel_socket())


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _show(args, value, table) -> None:
    if args.output == "json":
        output.print_json(value)
    else:
        table(value)


# commands
def cmd_up(args) -> int:
    state_dir = _state_dir(args)
    kernel_args = []
    for flag in ("listen", "tls_cert", "tls_key"):
        if getattr(args, flag):
            kernel_args += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if args.insecure:
        kernel_args.append("--insecure")
    service_args = {"vfm-modeld": ["--models", str(Path(args.models).resolve())]} \
        if args.models else {}
    listen = args.gateway_listen or os.environ.get("VFM_GATEWAY_LISTEN", "")
    gateway = None if listen == "off" else (["--listen", listen] if listen else [])
    started = daemons.up(state_dir, _say, timeout_s=args.timeout, kernel_args=kernel_args,
                         service_args=service_args, gateway_args=gateway)
    _say(f"VFMOS is up ({', '.join(started) or 'already running'}); "
         f"socket {state_dir / KERNEL_SOCKET}")
    address = daemons.gateway_address(state_dir)
    if address:
        _say(f"OpenAI-compatible API on {address}/v1 (API keys: 'vfmctl token create TENANT')")
    if not args.detach:
        _say("running in the foreground; Ctrl-C stops every daemon")
        daemons.wait_foreground(state_dir, _say)
    return 0


def cmd_down(args) -> int:
    stopped = daemons.down(_state_dir(args), _say)
    _say(f"stopped {stopped} daemon(s)" if stopped else "nothing was running")
    return 0


def cmd_status(args) -> int:
    with _client(args) as client:
        found = client.services()
    # Restarts are the supervisor's count, in the state dir of a kernel on this host.
    local = Path(args.socket).parent if args.socket else args.state_dir or kernel_socket().parent
    remote = bool(args.target or os.environ.get("VFM_TARGET"))
    restarts = {} if remote else daemons.restarts(local)
    gateway = None if remote else daemons.gateway_status(local)
    if gateway is not None:
        found.append(gateway)
    if args.output == "json":
        output.print_json([{**d.to_dict(), "restarts": restarts.get(d.name, 0)} for d in found])
    else:
        output.daemon_table(found, restarts)
    return 0 if all(d.health == "SERVING" for d in found) else 1


def cmd_spawn(args) -> int:
    quota = Quota(max_tokens=args.max_tokens, tokens_per_minute=args.tokens_per_minute,
                  max_concurrent=args.max_concurrent, cost_budget=args.cost_budget)
    route = routing.policy_from_args(args)
    with _client(args) as client:
        proc = client.spawn(args.name, priority=args.priority, model=args.model,
                            context_budget=args.context_budget, quota=quota,
                            system_prompt=args.system_prompt, collections=args.collection,
                            route=route)
    _show(args, proc, lambda p: output.process_table([p]))
    return 0


def cmd_ps(args) -> int:
    with _client(args) as client:
        procs = client.ps(all=args.all)
    _show(args, procs, output.process_table)
    return 0


def _signal(method: str):
    def run(args) -> int:
        with _client(args) as client:
            proc = getattr(client, method)(_pid(client, args.pid))
        _show(args, proc, lambda p: output.process_table([p]))
        return 0
    return run


def cmd_inspect(args) -> int:
    with _client(args) as client:
        proc = client.get(_pid(client, args.pid))
    _show(args, proc, output.process_detail)
    return 0


def _pid(client: Client, ref: str) -> int:
    """A pid, or the newest live process with that name."""
    if ref.isdigit():
        return int(ref)
    named = [p for p in client.ps() if p.name == ref]
    if not named:
        raise NotFound(f"no live process named {ref!r}")
    return max(named, key=lambda p: p.pid).pid


def cmd_ask(args) -> int:
    with _client(args) as client:
        pid = _pid(client, args.pid)
        result = None
        for item in client.ask_stream(pid, args.question, max_new_tokens=args.max_new_tokens,
                                      temperature=args.temperature, top_p=args.top_p,
                                      seed=args.seed, stop=args.stop,
                                      ttft_slo_ms=args.ttft_slo_ms):
            if isinstance(item, AskResult):
                result = item
            elif args.output != "json":
                print(item, end="", flush=True)
    if args.output == "json":
        output.print_json(result)
    else:
        print()
        u = result.usage
        _say(f"[{result.finish_reason}; {u.tokens_in} in, {u.tokens_out} out; queued "
             f"{u.queue_ms:.0f} ms, first token {u.ttft_ms:.0f} ms, total {u.total_ms:.0f} ms; "
             f"{u.model}{f' (routed: {u.route_reason})' if u.route_reason else ''}"
             f"{f'; confidence {u.confidence:.2f}' if u.confidence else ''}"
             f"{f'; {u.escalated_from} escalated, both charged' if u.escalated_from else ''}"
             f"{f'; preempted {u.preemptions}x' if u.preemptions else ''}; ask {u.ask_id}]")
        for d in result.degraded:  # e.g. [memory unavailable: vfm-datad not reachable]
            _say(f"[{d.kind.replace('-', ' ')}: {d.reason}]")
        if result.verdict is not None:  # e.g. [allowed · s1 75 ms · pii: redacted 1 email]
            _say(f"[{result.verdict.summary()}]")
    return 0


def cmd_top(args) -> int:
    with _client(args) as client:
        if args.output == "json":
            output.print_json({"usage": client.usage(), "processes": client.ps()})
            return 0
        if args.once:
            output.console().print(output.top_frame(client.usage(), client.ps()))
            return 0
        from rich.live import Live
        import time as _time
        with Live(output.top_frame(client.usage(), client.ps()), console=output.console(),
                  screen=False, auto_refresh=False) as live:
            while True:
                _time.sleep(args.interval)
                live.update(output.top_frame(client.usage(), client.ps()), refresh=True)


def cmd_tenant(args) -> int:
    with _client(args) as client:
        client.set_tenant_weight(args.tenant, args.weight)
    _say(f"tenant {args.tenant}: weight {args.weight:g}")
    return 0


def cmd_whoami(args) -> int:
    with _client(args) as client:
        me = client.whoami()
    _show(args, me, lambda i: print(f"{i.tenant} (uid {i.uid}, "
                                    f"{'admin, ' if i.admin else ''}{i.transport})"))
    return 0


def cmd_token(args) -> int:
    with _client(args) as client:
        if args.token_cmd == "create":
            limits = TokenLimits(max_tokens=args.max_tokens, cost_budget=args.cost_budget,
                                 requests_per_minute=args.requests_per_minute,
                                 max_concurrent=args.max_concurrent)
            secret, token_id = client.token_create(args.tenant, admin=args.admin,
                                                   label=args.label, limits=limits)
            _show(args, {"token": secret, "token_id": token_id}, lambda v: (
                print(v["token"]), _say(f"token id {v['token_id']}: shown once, store it now")))
        elif args.token_cmd == "revoke":
            client.token_revoke(args.token_id)
            _say(f"revoked {args.token_id}")
        else:
            _show(args, client.token_list(), output.token_table)
    return 0


def _common(parser: argparse.ArgumentParser, json_output: bool = True) -> None:
    """Options every command takes, so they work before or after the command name."""
    group = parser.add_argument_group("connection")
    group.add_argument("--socket", default=argparse.SUPPRESS, help="kernel socket path")
    group.add_argument("--state-dir", type=Path, default=argparse.SUPPRESS,
                       help="state dir holding vfmd.sock (and daemons' logs and pids)")
    group.add_argument("--target", default=argparse.SUPPRESS,
                       help="remote kernel HOST:PORT (TCP; needs --token)")
    group.add_argument("--token", default=argparse.SUPPRESS, help="bearer token ($VFM_TOKEN)")
    group.add_argument("--tls-ca", default=argparse.SUPPRESS, help="CA bundle for TLS to --target")
    if json_output:
        parser.add_argument("-o", "--output", choices=("table", "json"), default=argparse.SUPPRESS,
                            help="table for people (default) or json for scripts")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vfmctl", description="Control VFMOS: daemons, FM processes and questions to them.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, func, help: str, json_output: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _common(p, json_output)
        p.set_defaults(func=func)
        return p

    p = add("up", cmd_up, "start vfmd and every service daemon, and wait until they serve",
            json_output=False)
    p.add_argument("--detach", action="store_true",
                   help="return once everything serves (default: stay in the foreground)")
    p.add_argument("--listen", help="let vfmd also serve TCP on HOST:PORT (bearer tokens)")
    p.add_argument("--tls-cert", help="PEM certificate for --listen")
    p.add_argument("--tls-key", help="PEM private key for --listen")
    p.add_argument("--insecure", action="store_true",
                   help="allow --listen off loopback without TLS (tokens travel in clear)")
    p.add_argument("--gateway-listen", metavar="HOST:PORT",
                   help="where vfm-gatewayd serves the OpenAI API (default 127.0.0.1:8080 or "
                        "$VFM_GATEWAY_LISTEN; port 0 picks a free one; 'off': no gateway)")
    p.add_argument("--models", help="JSON file of extra models for vfm-modeld (local paths, "
                   "OpenAI-compatible servers); see README")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds to wait for each daemon (default 600: a first start converts "
                        "the model)")
    add("down", cmd_down, "stop the daemons that 'vfmctl up' started", json_output=False)
    add("status", cmd_status, "show each daemon: pid, health, RSS, CPU, uptime and restarts")

    p = add("spawn", cmd_spawn, "create an FM process and print it")
    p.add_argument("name", help="process name: letters, digits, '.', '_', '-'")
    p.add_argument("--priority", type=int, default=20, help="0 (lowest) to 39 (highest), default 20")
    p.add_argument("--max-tokens", type=int, default=0, help="total token budget (0 = unlimited)")
    p.add_argument("--tokens-per-minute", type=int, default=0, help="rate limit (0 = unlimited)")
    p.add_argument("--max-concurrent", type=int, default=0, help="concurrent asks (0 = unlimited)")
    p.add_argument("--cost-budget", type=float, default=0.0, help="cost budget (0 = unlimited)")
    p.add_argument("--context-budget", type=int, default=0,
                   help="working-set budget in tokens (0 = 1,024)")
    p.add_argument("--collection", action="append", default=[], metavar="NAME",
                   help="a knowledge collection the process retrieves from (repeatable)")
    p.add_argument("--model", default="", help="physical model (default: the default model); "
                   "'auto': the router picks one per Ask")
    p.add_argument("--system-prompt", default="", help="pinned system prompt")
    routing.add_spawn_options(p)

    p = add("ps", cmd_ps, "list FM processes (yours; all tenants' for an admin)")
    p.add_argument("-a", "--all", action="store_true", help="include killed and exited processes")
    for name, method, text in (("kill", "kill", "kill an FM process (stops its answers)"),
                               ("suspend", "suspend", "suspend an FM process"),
                               ("resume", "resume", "resume a suspended FM process")):
        add(name, _signal(method), text).add_argument("pid", help="pid (or process name)")
    add("inspect", cmd_inspect, "show a process: spec, state, usage against every quota") \
        .add_argument("pid", help="pid (or process name)")

    p = add("ask", cmd_ask, "ask an FM process a question; the answer streams as it is made")
    p.add_argument("pid", help="pid (or process name)")
    p.add_argument("question")
    p.add_argument("--max-new-tokens", type=int, default=0, help="answer length cap (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling (0 = off)")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling")
    p.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    p.add_argument("--ttft-slo", type=float, default=0.0, dest="ttft_slo_ms", metavar="MS",
                   help="first token wanted within MS milliseconds (earliest deadline first)")

    p = add("top", cmd_top, "live view of the scheduler, tenants and busiest processes")
    p.add_argument("--once", action="store_true", help="print one frame and exit")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between frames")
    p = add("tenant", cmd_tenant, "set a tenant's fair-share weight (admin)", json_output=False)
    tsub_w = p.add_subparsers(dest="tenant_cmd", metavar="ACTION", required=True)
    w = tsub_w.add_parser("weight", help="set the weight (default 1; 3 = three times the share)")
    w.add_argument("tenant")
    w.add_argument("weight", type=float)

    knowledge.add_commands(add, _client, _pid, _common)
    routing.add_commands(add, _client, _pid, _show, _common)
    models.add_commands(add, _client, _show, _say, _common)
    trust.add_commands(add, _client, _pid, _common)
    add("whoami", cmd_whoami, "show the identity (tenant) the kernel sees for you")
    p = add("token", cmd_token, "manage bearer tokens for TCP clients (admin)")
    tsub = p.add_subparsers(dest="token_cmd", metavar="ACTION", required=True)
    t = tsub.add_parser("create", help="create a token for a tenant; printed once",
                        description="Create a bearer token for TENANT; the secret is printed "
                        "once. The kernel holds every call made with it, over TCP or the "
                        "socket, to the limits given (each 0 = unlimited, the default).")
    t.add_argument("tenant")
    t.add_argument("--admin", action="store_true", help="the token may act for every tenant")
    t.add_argument("--label", default="", help="a note to recognise the token by")
    t.add_argument("--max-tokens", type=int, default=0, metavar="N",
                   help="total tokens (prompt + answer) of the token's asks (0 = unlimited)")
    t.add_argument("--cost-budget", type=float, default=0.0, metavar="X",
                   help="total cost of its asks, in the model registry's unit (0 = unlimited)")
    t.add_argument("--requests-per-minute", type=int, default=0, metavar="R",
                   help="calls of any kind in any 60 s (0 = unlimited)")
    t.add_argument("--max-concurrent", type=int, default=0, metavar="C",
                   help="calls in flight at once; an ask counts until it ends (0 = unlimited)")
    r = tsub.add_parser("revoke", help="revoke a token by its id")
    r.add_argument("token_id")
    listing = tsub.add_parser("list", help="list tokens (ids, tenants, limits and usage, "
                              "never secrets)")
    for action in (w, t, r, listing):
        _common(action, json_output=action is not w)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name, default in (("socket", None), ("state_dir", None), ("target", None),
                          ("token", None), ("tls_ca", None), ("output", "table")):
        if not hasattr(args, name):
            setattr(args, name, default)
    try:
        return args.func(args)
    except VfmError as err:
        output.error(err.message)
        return EXIT_CODES.get(err.code, 1)
    except daemons.UpError as err:
        output.error(str(err))
        return 6
    except (OSError, ValueError) as err:
        output.error(str(err))
        return 1
    except KeyboardInterrupt:
        output.error("interrupted")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
