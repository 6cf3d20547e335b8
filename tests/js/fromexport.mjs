// The AWS SDK for JavaScript v3 given the configuration object `imsa export --format js` printed (the file named
// by the first argument), as a person pastes it into `new STSClient(...)`: one JSON line on stdout,
// {"Arn", "AccessKeyId" (its last 4 characters only), "expiration", "region"}.
//
// STS is the endpoint in WHOAMI_STS_ENDPOINT, as in whoami.mjs. A failure is one line on stderr, exit 1.
import { readFileSync } from "node:fs";
import { GetCallerIdentityCommand, STSClient } from "@aws-sdk/client-sts";

async function main() {
  const endpoint = process.env.WHOAMI_STS_ENDPOINT;
  if (!endpoint) {
    throw new Error("WHOAMI_STS_ENDPOINT is not set");
  }
  // The printed text is a JavaScript expression (it holds `new Date(...)`), not JSON.
  const config = (0, eval)(`(${readFileSync(process.argv[2], "utf8")})`);
  const client = new STSClient({ region: "us-east-1", ...config, endpoint });
  const identity = await client.send(new GetCallerIdentityCommand({}));
  return {
    Arn: identity.Arn,
    AccessKeyId: config.credentials.accessKeyId.slice(-4),
    expiration: config.credentials.expiration.toISOString(),
    region: await client.config.region(),
  };
}

try {
  console.log(JSON.stringify(await main()));
} catch (error) {
  console.error(`fromexport: error: ${error.name}: ${error.message}`);
  process.exitCode = 1;
}
