/* tls_fixture.h - a throwaway self-signed P-256 certificate and its key for
 * fuzz_tls_listener (test material only, never used by the service). */
#ifndef ZM_FUZZ_TLS_FIXTURE_H
#define ZM_FUZZ_TLS_FIXTURE_H

static const char FUZZ_CERT_PEM[] =
    "-----BEGIN CERTIFICATE-----\n"
    "MIIBoDCCAUagAwIBAgIUElUOwJ0y+I/JIK473hMUpwWGxNEwCgYIKoZIzj0EAwIw\n"
    "DzENMAsGA1UEAwwEZnV6ejAgFw0yNjEyMDExNDA0NDhaGA8yMTI2MTEwNzE0MDQ0\n"
    "OFowDzENMAsGA1UEAwwEZnV6ejBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABLZh\n"
    "jb005mvYbSeK2thx8iJlUx0UKOZRfx0PpySlQD4Em/T3smJVn0bm0uAH3K1SU5Ee\n"
    "p55/UEUwv533A+uF0dujfjB8MB0GA1UdDgQWBBS3ESXwhU045nm1VqxypYTfZp2J\n"
    "AjAfBgNVHSMEGDAWgBS3ESXwhU045nm1VqxypYTfZp2JAjAPBgNVHRMBAf8EBTAD\n"
    "AQH/MCkGA1UdEQQiMCCGEnNwaWZmZTovL2Z1enovc2EveIIKZnV6ei5sb2NhbDAK\n"
    "BggqhkjOPQQDAgNIADBFAiB991mlbdO/3XxPgNpeIm4QcoZ0QNqDcXZr+x3LDMng\n"
    "gAIhAJ656V1Zfi416OSvua4F2FtqNWxIsll7z56UXAcayKi8\n"
    "-----END CERTIFICATE-----\n";

static const char FUZZ_KEY_PEM[] =
    "-----BEGIN PRIVATE KEY-----\n"
    "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgj7KKsC3noaOGsaWO\n"
    "9h4MVumqOoywpBJI8M3ooU5H0EihRANCAAS2YY29NOZr2G0nitrYcfIiZVMdFCjm\n"
    "UX8dD6ckpUA+BJv097JiVZ9G5tLgB9ytUlORHqeef1BFML+d9wPrhdHb\n"
    "-----END PRIVATE KEY-----\n";

#endif
