// VFMOS from Node.js: trade our uid for a ticket on vfmd.sock.cred, then Spawn and GetProcess.
// Usage: node client.js [/path/to/vfmd.sock] [process-name]   (docs/grpc.md explains each step)
const net = require("node:net"), path = require("node:path");
const grpc = require("@grpc/grpc-js"), loader = require("@grpc/proto-loader");
const { decode } = require("@msgpack/msgpack");

const sock = process.argv[2] || process.env.VFM_SOCKET || "/run/vfmos/vfmd.sock";
const name = process.argv[3] || "node-hello";
const fetchTicket = (p) => new Promise((resolve, reject) => {  // the kernel writes one msgpack map, then closes
  const parts = [];
  net.connect(p).on("data", (d) => parts.push(d)).on("error", reject)
    .on("end", () => resolve(decode(Buffer.concat(parts)).ticket));
});
const def = loader.loadSync("vfmos/kernel/v1/kernel.proto", { includeDirs: [path.join(__dirname, "../../proto")],
  keepCase: true, longs: String, enums: String, defaults: true });
const { KernelService } = grpc.loadPackageDefinition(def).vfmos.kernel.v1;

(async () => {
  const meta = new grpc.Metadata();
  meta.set("x-vfm-ticket", await fetchTicket(sock + ".cred"));
  const kernel = new KernelService(`unix:${sock}`, grpc.credentials.createInsecure());
  const call = (rpc, req) => new Promise((ok, fail) => kernel[rpc](req, meta, (e, r) => (e ? fail(e) : ok(r))));
  const { process: spawned } = await call("SpawnProcess", { spec: { name } });
  const { process: got } = await call("GetProcess", { pid: spawned.pid });
  console.log(JSON.stringify({ pid: Number(got.pid), name: got.spec.name, state: got.state, tenant: got.tenant }));
  kernel.close();
})().catch((err) => { console.error(`error: ${err.code ?? ""} ${err.details ?? err.message}`); process.exit(1); });
