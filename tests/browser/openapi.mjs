// The OpenAPI document as a contract (run by tests/api/openapi_contract.rs):
// 1. validates /api/v2/openapi.json against the OpenAPI 3.1 schema (@seriousme/openapi-schema-validator);
// 2. builds a client from the document at run time (openapi-client-axios: one method per operationId)
//    and drives register → submit (multipart source upload) → poll → status with it.
// Usage: node tests/browser/openapi.mjs <base URL> <admin key> <source zip>
// Prints one JSON line with what it saw; exits non-zero on any failure.

import { readFile } from "node:fs/promises";
import { Validator } from "@seriousme/openapi-schema-validator";
import { OpenAPIClientAxios } from "openapi-client-axios";

const [base, key, sourcePath] = process.argv.slice(2);
if (!base || !key || !sourcePath) {
  console.error("usage: node openapi.mjs <base URL> <admin key> <source zip>");
  process.exit(2);
}

const fail = (message) => {
  console.error(message);
  process.exit(1);
};

const response = await fetch(`${base}/api/v2/openapi.json`);
if (!response.ok) fail(`GET /api/v2/openapi.json: ${response.status}`);
const document = await response.json();

const validator = new Validator();
const validation = await validator.validate(structuredClone(document));
if (!validation.valid) {
  fail(`the document is not valid OpenAPI ${validator.version}: ${JSON.stringify(validation.errors, null, 2)}`);
}

const api = new OpenAPIClientAxios({
  definition: document,
  axiosConfigDefaults: { baseURL: base, headers: { "X-API-Key": key }, validateStatus: () => true },
});
const client = await api.init();
const expect = (what, answer, status) => {
  if (answer.status !== status) fail(`${what}: expected ${status}, got ${answer.status} ${JSON.stringify(answer.data)}`);
  return answer.data;
};

// register
const worker = expect(
  "register",
  await client.post_api_workers_register(null, { name: "generated-client", capabilities: { platforms: ["ios"] } }),
  200,
);

// submit: the multipart body the document describes (source as a binary part, platform as text)
const form = new FormData();
form.append("source", new Blob([await readFile(sourcePath)], { type: "application/zip" }), "app.zip");
form.append("platform", "ios");
const submitted = expect("submit", await client.post_api_builds_submit(null, form), 200);

// poll (G0 mode: the admin key and ?worker_id=)
const polled = expect("poll", await client.get_api_workers_poll({ worker_id: worker.id }), 200);

// status, as the submitter with the build token alone
const status = expect(
  "status",
  await client.get_api_builds_id_status({ id: submitted.id }, null, {
    headers: { "X-API-Key": undefined, "X-Build-Token": submitted.access_token },
  }),
  200,
);

// an operator route refuses a call without the key, as documented
const refused = await client.get_api_v2_builds(null, null, { headers: { "X-API-Key": undefined } });

console.log(
  JSON.stringify({
    valid: validation.valid,
    openapi: document.openapi,
    operations: Object.keys(client.api.getOperations ? Object.fromEntries(client.api.getOperations().map((o) => [o.operationId, 1])) : {}).length,
    worker_id: worker.id,
    worker_token: typeof worker.access_token === "string" && worker.access_token.length > 0,
    submitted_id: submitted.id,
    polled_job_id: polled.job?.id ?? null,
    polled_source_url: polled.job?.source_url ?? null,
    status_id: status.id,
    status: status.status,
    refused_status: refused.status,
    refused_error: refused.data?.error ?? null,
  }),
);
