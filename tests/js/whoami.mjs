// Who the AWS SDK for JavaScript v3 is, through its default credential chain: one JSON line on stdout,
// {"Arn", "AccessKeyId" (its last 4 characters only), "provider", "env"}.
//
// - "provider": the credential features the SDK tags its credentials with (e.g. CREDENTIALS_HTTP for a container
//   endpoint, CREDENTIALS_PROFILE_PROCESS for credential_process); the chain's IMDS provider tags none, so [] there.
// - "env": the names (never the values) of the variables set in this process that steer the chain.
//
// STS is the endpoint in WHOAMI_STS_ENDPOINT, passed explicitly rather than left to the SDK's own reading of
// AWS_ENDPOINT_URL_STS, so that nothing but the fake STS can answer. A failure is one line on stderr, exit 1.
import { GetCallerIdentityCommand, STSClient } from "@aws-sdk/client-sts";
import { fromNodeProviderChain } from "@aws-sdk/credential-providers";

const REGION = "us-east-1";
// Variables that decide, or would shadow, where the chain finds credentials.
const CHAIN_VARIABLES = [
  "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_CREDENTIAL_EXPIRATION", "AWS_PROFILE",
  "AWS_DEFAULT_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
  "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_AUTHORIZATION_TOKEN",
  "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", "AWS_EC2_METADATA_SERVICE_ENDPOINT", "AWS_EC2_METADATA_DISABLED",
  "AWS_EC2_METADATA_V1_DISABLED",
];

async function main() {
  const endpoint = process.env.WHOAMI_STS_ENDPOINT;
  if (!endpoint) {
    throw new Error("WHOAMI_STS_ENDPOINT is not set");
  }
  const chain = fromNodeProviderChain();
  const credentials = await chain();
  const client = new STSClient({ region: REGION, endpoint, credentials: chain });
  const identity = await client.send(new GetCallerIdentityCommand({}));
  return {
    Arn: identity.Arn,
    AccessKeyId: credentials.accessKeyId.slice(-4),
    provider: Object.keys(credentials.$source || {}).sort(),
    env: CHAIN_VARIABLES.filter((name) => process.env[name] !== undefined),
  };
}

try {
  console.log(JSON.stringify(await main()));
} catch (error) {
  console.error(`whoami: error: ${error.name}: ${error.message}`);
  process.exitCode = 1;
}
