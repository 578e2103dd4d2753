/*
 * iotfleet_devices: Mosquitto 2.0 plugin that authenticates and authorises the platform's DEVICES
 * from one file the broker agent writes, one line per device: "<id> <type> $6$<b64 salt>$<b64 sha512>"
 * for a password device, "<id> <type> x509:<hex sha256 of the certificate's DER>" for a certificate
 * device (the pinned fingerprint of the one certificate the registry issued it).
 *
 * Why a plugin and not password_file + acl_file: Mosquitto 2.0.11's file ACL cannot pin a device's
 * TYPE (patterns substitute only %u/%c), never checks SUBSCRIBE (no SUBACK 135 for another device's
 * topics), and per-user blocks make every reload quadratic; dynamic security rewrites its whole JSON
 * on every change. Here: a hash table, O(1) per CONNECT and per ACL check, O(n) per reload.
 *
 * - BASIC_AUTH: a username found in the file must present client id == username and the password
 *   whose salted SHA-512 is on file; anything else is refused (CONNACK 135). Unknown usernames are
 *   deferred, so dynamic security keeps the platform's own accounts.
 * - Certificates: a client that presented a TLS client certificate (only a listener with
 *   require_certificate true asks for one; Mosquitto has checked it chains to cafile and is not in
 *   crlfile) is accepted only if the certificate's CN is a certificate device on file, the client id
 *   equals that CN, the username (if any) equals it too, and the certificate's SHA-256 is the pinned
 *   one; the username is then set to the CN (mosquitto_set_username) so the ACL check finds it.
 *   Anything else with a certificate is refused (CONNACK 135), and a certificate device is refused
 *   without its certificate (a password cannot stand in for it).
 * - ACL_CHECK: a device may publish only devices/<its type>/<its id>/<c> for c in `publish`, and
 *   subscribe to / receive only devices/<its type>/<its id>/<c> for c in `subscribe` (exact topics,
 *   no wildcards; a channel may span levels, e.g. "state/delta"): PUBACK/SUBACK 135 otherwise.
 * - The file is re-read on SIGHUP (MOSQ_EVT_RELOAD) and when its inode/mtime/size changes (checked on
 *   MOSQ_EVT_TICK), so the agent only needs an atomic rename. Devices removed or whose hash changed
 *   are kicked at once (disable, delete, credential rotation).
 *
 * - Per-device byte budget (token bucket): a device may publish at most `rate_bytes` bytes a second
 *   with bursts of `burst_bytes`; beyond, its publishes are refused (PUBACK 135, QoS 0 dropped)
 *   before the broker queues them for the platform's sessions. Mosquitto 2.0 has no per-client
 *   rate limit, and one flooding device otherwise fills the broker's memory and delays every other
 *   device's readings behind its own (docs/benchmarks.md, hostile flood).
 *
 * Options: plugin_opt_devices_file PATH (required), plugin_opt_root (default "devices"),
 *          plugin_opt_publish "telemetry,status,acks", plugin_opt_subscribe "commands",
 *          plugin_opt_rate_bytes (default 1048576, 0 = no limit), plugin_opt_burst_bytes (default 8388608).
 */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/x509.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>

#define SALT_LEN 12
#define HASH_LEN 64
#define MAX_CHANNELS 16
#define FP_LEN 32
#define CERT_PREFIX "x509:"

struct device {
	char *id;   /* NULL: empty slot */
	char *type;
	unsigned char salt[SALT_LEN];
	unsigned char hash[HASH_LEN];
	bool cert;                  /* a certificate device: fp is its pinned certificate's SHA-256 */
	unsigned char fp[FP_LEN];
	double tokens;     /* bytes it may still publish now (token bucket) */
	double refilled_at; /* monotonic seconds of the last refill */
};

struct table {
	struct device *slots;
	size_t capacity; /* power of two */
	size_t count;
};

static mosquitto_plugin_id_t *plugin_id;
static char *devices_file;
static char *root;
static char *publish_channels[MAX_CHANNELS];
static int publish_count;
static char *subscribe_channels[MAX_CHANNELS];
static int subscribe_count;
static struct table devices;
static struct stat loaded_stat;
static bool have_loaded_stat;
static time_t last_stat_check;
static double rate_bytes = 1048576.0;
static double burst_bytes = 8388608.0;
static unsigned long refused_over_rate;
static time_t last_rate_report;

static double monotonic_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static uint64_t fnv1a(const char *s)
{
	uint64_t h = 1469598103934665603ULL;
	while(*s){
		h ^= (unsigned char)*s++;
		h *= 1099511628211ULL;
	}
	return h;
}

static struct device *table_find(const struct table *t, const char *id)
{
	if(t->capacity == 0 || id == NULL) return NULL;
	size_t mask = t->capacity - 1;
	for(size_t i = fnv1a(id) & mask;; i = (i + 1) & mask){
		struct device *d = &t->slots[i];
		if(d->id == NULL) return NULL;
		if(strcmp(d->id, id) == 0) return d;
	}
}

static void table_free(struct table *t)
{
	for(size_t i = 0; i < t->capacity; i++){
		free(t->slots[i].id);
		free(t->slots[i].type);
	}
	free(t->slots);
	t->slots = NULL;
	t->capacity = t->count = 0;
}

static int b64_decode(const char *in, size_t inlen, unsigned char *out, size_t want)
{
	unsigned char buf[128];
	if(inlen == 0 || inlen % 4 != 0 || inlen / 4 * 3 > sizeof(buf)) return -1;
	int n = EVP_DecodeBlock(buf, (const unsigned char *)in, (int)inlen);
	if(n < 0) return -1;
	/* EVP_DecodeBlock counts '=' padding as zero bytes */
	size_t pad = 0;
	if(in[inlen - 1] == '=') pad++;
	if(in[inlen - 2] == '=') pad++;
	if((size_t)n - pad != want) return -1;
	memcpy(out, buf, want);
	return 0;
}

static int hex_value(char c)
{
	if(c >= '0' && c <= '9') return c - '0';
	if(c >= 'a' && c <= 'f') return c - 'a' + 10;
	if(c >= 'A' && c <= 'F') return c - 'A' + 10;
	return -1;
}

static int hex_decode(const char *in, unsigned char *out, size_t want)
{
	if(strlen(in) != 2 * want) return -1;
	for(size_t i = 0; i < want; i++){
		int hi = hex_value(in[2 * i]), lo = hex_value(in[2 * i + 1]);
		if(hi < 0 || lo < 0) return -1;
		out[i] = (unsigned char)(hi << 4 | lo);
	}
	return 0;
}

/* "<id> <type> $6$<salt>$<hash>" or "<id> <type> x509:<hex sha256>" -> fields; returns 0 on success. */
static int parse_line(char *line, char **id, char **type, struct device *cred)
{
	char *save = NULL;
	unsigned char *salt = cred->salt, *hash = cred->hash;
	*id = strtok_r(line, " \t", &save);
	*type = strtok_r(NULL, " \t", &save);
	char *pw = strtok_r(NULL, " \t\r\n", &save);
	if(*id == NULL || *type == NULL || pw == NULL) return -1;
	if(strncmp(pw, CERT_PREFIX, strlen(CERT_PREFIX)) == 0){
		cred->cert = true;
		return hex_decode(pw + strlen(CERT_PREFIX), cred->fp, FP_LEN);
	}
	cred->cert = false;
	if(strncmp(pw, "$6$", 3) != 0) return -1;
	char *salt_b64 = pw + 3;
	char *dollar = strchr(salt_b64, '$');
	if(dollar == NULL) return -1;
	if(b64_decode(salt_b64, (size_t)(dollar - salt_b64), salt, SALT_LEN)) return -1;
	if(b64_decode(dollar + 1, strlen(dollar + 1), hash, HASH_LEN)) return -1;
	return 0;
}

static int table_load(const char *path, struct table *out, struct stat *st)
{
	FILE *f = fopen(path, "r");
	if(f == NULL){
		mosquitto_log_printf(MOSQ_LOG_ERR, "iotfleet_devices: cannot open %s: %s", path, strerror(errno));
		return -1;
	}
	if(fstat(fileno(f), st) != 0){
		fclose(f);
		return -1;
	}
	/* count lines first: the table is sized once (load factor <= 0.5) */
	size_t lines = 0;
	int c;
	while((c = fgetc(f)) != EOF) if(c == '\n') lines++;
	rewind(f);
	size_t capacity = 16;
	while(capacity < 2 * (lines + 1)) capacity <<= 1;
	out->slots = calloc(capacity, sizeof(struct device));
	if(out->slots == NULL){
		fclose(f);
		return -1;
	}
	out->capacity = capacity;
	out->count = 0;
	char *line = NULL;
	size_t cap = 0;
	size_t bad = 0;
	while(getline(&line, &cap, f) != -1){
		if(line[0] == '#' || line[0] == '\n') continue;
		char *id, *type;
		struct device cred = {0};
		if(parse_line(line, &id, &type, &cred)){
			bad++;
			continue;
		}
		size_t mask = capacity - 1;
		size_t i = fnv1a(id) & mask;
		while(out->slots[i].id != NULL && strcmp(out->slots[i].id, id) != 0) i = (i + 1) & mask;
		struct device *d = &out->slots[i];
		if(d->id == NULL){
			d->id = strdup(id);
			d->type = strdup(type);
			if(d->id == NULL || d->type == NULL) break;
			d->tokens = burst_bytes;
			d->refilled_at = monotonic_s();
			out->count++;
		}
		memcpy(d->salt, cred.salt, SALT_LEN);
		memcpy(d->hash, cred.hash, HASH_LEN);
		d->cert = cred.cert;
		memcpy(d->fp, cred.fp, FP_LEN);
	}
	free(line);
	fclose(f);
	if(bad){
		mosquitto_log_printf(MOSQ_LOG_WARNING, "iotfleet_devices: %zu malformed line(s) in %s ignored", bad, path);
	}
	return 0;
}

/* Re-read the file; kick every device that disappeared or whose credentials changed. */
static void reload(const char *why)
{
	struct table fresh = {0};
	struct stat st;
	if(table_load(devices_file, &fresh, &st)){
		table_free(&fresh);
		mosquitto_log_printf(MOSQ_LOG_ERR, "iotfleet_devices: reload (%s) failed; keeping %zu devices", why, devices.count);
		return;
	}
	size_t kicked = 0;
	for(size_t i = 0; i < devices.capacity; i++){
		struct device *old = &devices.slots[i];
		if(old->id == NULL) continue;
		struct device *now = table_find(&fresh, old->id);
		if(now == NULL || memcmp(now->hash, old->hash, HASH_LEN) != 0 || memcmp(now->salt, old->salt, SALT_LEN) != 0
				|| strcmp(now->type, old->type) != 0 || now->cert != old->cert || memcmp(now->fp, old->fp, FP_LEN) != 0){
			mosquitto_kick_client_by_username(old->id, false);
			kicked++;
		}else{
			/* a reload must not hand a flooding device a fresh burst */
			now->tokens = old->tokens;
			now->refilled_at = old->refilled_at;
		}
	}
	table_free(&devices);
	devices = fresh;
	loaded_stat = st;
	have_loaded_stat = true;
	mosquitto_log_printf(MOSQ_LOG_NOTICE, "iotfleet_devices: %zu devices loaded from %s (%s), %zu kicked",
			devices.count, devices_file, why, kicked);
}

static bool password_ok(const struct device *d, const char *password)
{
	if(password == NULL) return false;
	unsigned char digest[EVP_MAX_MD_SIZE];
	unsigned int len = 0;
	EVP_MD_CTX *ctx = EVP_MD_CTX_new();
	if(ctx == NULL) return false;
	bool ok = EVP_DigestInit_ex(ctx, EVP_sha512(), NULL) == 1
		&& EVP_DigestUpdate(ctx, password, strlen(password)) == 1
		&& EVP_DigestUpdate(ctx, d->salt, SALT_LEN) == 1
		&& EVP_DigestFinal_ex(ctx, digest, &len) == 1
		&& len == HASH_LEN
		&& CRYPTO_memcmp(digest, d->hash, HASH_LEN) == 0;
	EVP_MD_CTX_free(ctx);
	return ok;
}

/* A client that presented a certificate (already verified by Mosquitto against cafile and crlfile). */
static int certificate_auth(struct mosquitto_evt_basic_auth *ed, X509 *peer)
{
	char cn[256];
	int rc = MOSQ_ERR_AUTH;
	int len = X509_NAME_get_text_by_NID(X509_get_subject_name(peer), NID_commonName, cn, sizeof(cn));
	/* len must be the whole CN: an embedded NUL must not shorten it into another device's id */
	if(len > 0 && (size_t)len < sizeof(cn) && strlen(cn) == (size_t)len){
		const struct device *d = table_find(&devices, cn);
		const char *client_id = mosquitto_client_id(ed->client);
		unsigned char fp[EVP_MAX_MD_SIZE];
		unsigned int fplen = 0;
		if(d != NULL && d->cert && client_id != NULL && strcmp(client_id, d->id) == 0
				&& (ed->username == NULL || strcmp(ed->username, d->id) == 0)
				&& X509_digest(peer, EVP_sha256(), fp, &fplen) == 1 && fplen == FP_LEN
				&& CRYPTO_memcmp(fp, d->fp, FP_LEN) == 0){
			/* the ACL check looks the device up by username */
			rc = ed->username != NULL ? MOSQ_ERR_SUCCESS
				: (mosquitto_set_username(ed->client, d->id) == MOSQ_ERR_SUCCESS ? MOSQ_ERR_SUCCESS : MOSQ_ERR_AUTH);
		}
	}
	X509_free(peer);
	return rc;
}

static int on_basic_auth(int event, void *event_data, void *userdata)
{
	(void)event; (void)userdata;
	struct mosquitto_evt_basic_auth *ed = event_data;
	X509 *peer = mosquitto_client_certificate(ed->client); /* a new reference, or NULL */
	if(peer != NULL) return certificate_auth(ed, peer);
	const struct device *d = table_find(&devices, ed->username);
	if(d == NULL) return MOSQ_ERR_PLUGIN_DEFER;
	if(d->cert) return MOSQ_ERR_AUTH; /* a certificate device must present its certificate */
	const char *client_id = mosquitto_client_id(ed->client);
	if(client_id == NULL || strcmp(client_id, d->id) != 0) return MOSQ_ERR_AUTH;
	return password_ok(d, ed->password) ? MOSQ_ERR_SUCCESS : MOSQ_ERR_AUTH;
}

static bool channel_in(const char *channel, char **set, int count)
{
	for(int i = 0; i < count; i++) if(strcmp(channel, set[i]) == 0) return true;
	return false;
}

/* Token bucket per device: refill at rate_bytes/s up to burst_bytes, then pay the payload. */
static bool within_budget(struct device *d, uint32_t payloadlen)
{
	if(rate_bytes <= 0) return true;
	double now = monotonic_s();
	d->tokens += (now - d->refilled_at) * rate_bytes;
	if(d->tokens > burst_bytes) d->tokens = burst_bytes;
	d->refilled_at = now;
	if((double)payloadlen > d->tokens){
		refused_over_rate++;
		return false;
	}
	d->tokens -= (double)payloadlen;
	return true;
}

static int on_acl_check(int event, void *event_data, void *userdata)
{
	(void)event; (void)userdata;
	struct mosquitto_evt_acl_check *ed = event_data;
	struct device *d = table_find(&devices, mosquitto_client_username(ed->client));
	if(d == NULL) return MOSQ_ERR_PLUGIN_DEFER;
	if(ed->access == MOSQ_ACL_UNSUBSCRIBE) return MOSQ_ERR_SUCCESS;
	/* devices/<type>/<id>/<channel>, exactly */
	const char *t = ed->topic;
	size_t n = strlen(root);
	if(t == NULL || strncmp(t, root, n) != 0 || t[n] != '/') return MOSQ_ERR_ACL_DENIED;
	t += n + 1;
	n = strlen(d->type);
	if(strncmp(t, d->type, n) != 0 || t[n] != '/') return MOSQ_ERR_ACL_DENIED;
	t += n + 1;
	n = strlen(d->id);
	if(strncmp(t, d->id, n) != 0 || t[n] != '/') return MOSQ_ERR_ACL_DENIED;
	/* The rest must equal a configured channel exactly; channels may hold '/' (state/delta), and a
	 * wildcard (+, #) or any extra level never equals one. */
	const char *channel = t + n + 1;
	switch(ed->access){
		case MOSQ_ACL_WRITE:
			if(!channel_in(channel, publish_channels, publish_count)) return MOSQ_ERR_ACL_DENIED;
			return within_budget(d, ed->payloadlen) ? MOSQ_ERR_SUCCESS : MOSQ_ERR_ACL_DENIED;
		case MOSQ_ACL_READ:
		case MOSQ_ACL_SUBSCRIBE:
			return channel_in(channel, subscribe_channels, subscribe_count) ? MOSQ_ERR_SUCCESS : MOSQ_ERR_ACL_DENIED;
		default:
			return MOSQ_ERR_ACL_DENIED;
	}
}

static int on_reload(int event, void *event_data, void *userdata)
{
	(void)event; (void)event_data; (void)userdata;
	reload("SIGHUP");
	return MOSQ_ERR_SUCCESS;
}

static int on_tick(int event, void *event_data, void *userdata)
{
	(void)event; (void)event_data; (void)userdata;
	time_t now = time(NULL);
	if(now == last_stat_check) return MOSQ_ERR_SUCCESS; /* at most one stat() a second */
	last_stat_check = now;
	if(refused_over_rate && now - last_rate_report >= 10){
		mosquitto_log_printf(MOSQ_LOG_WARNING, "iotfleet_devices: %lu publishes refused over the per-device byte budget"
				" (%.0f B/s, burst %.0f B) in the last %ld s", refused_over_rate, rate_bytes, burst_bytes,
				(long)(last_rate_report ? now - last_rate_report : 10));
		refused_over_rate = 0;
		last_rate_report = now;
	}
	struct stat st;
	if(stat(devices_file, &st) != 0) return MOSQ_ERR_SUCCESS;
	if(!have_loaded_stat || st.st_ino != loaded_stat.st_ino || st.st_mtim.tv_sec != loaded_stat.st_mtim.tv_sec
			|| st.st_mtim.tv_nsec != loaded_stat.st_mtim.tv_nsec || st.st_size != loaded_stat.st_size){
		reload("file changed");
	}
	return MOSQ_ERR_SUCCESS;
}

static int split_channels(const char *value, char **set, int *count)
{
	char *copy = strdup(value), *save = NULL;
	if(copy == NULL) return -1;
	*count = 0;
	for(char *tok = strtok_r(copy, ", ", &save); tok; tok = strtok_r(NULL, ", ", &save)){
		if(*count == MAX_CHANNELS){
			free(copy);
			return -1;
		}
		set[(*count)++] = strdup(tok);
	}
	free(copy);
	return 0;
}

int mosquitto_plugin_version(int supported_version_count, const int *supported_versions)
{
	for(int i = 0; i < supported_version_count; i++) if(supported_versions[i] == 5) return 5;
	return -1;
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **userdata, struct mosquitto_opt *opts, int opt_count)
{
	(void)userdata;
	plugin_id = identifier;
	const char *publish = "telemetry,status,acks", *subscribe = "commands", *root_opt = "devices";
	for(int i = 0; i < opt_count; i++){
		if(strcmp(opts[i].key, "devices_file") == 0) devices_file = strdup(opts[i].value);
		else if(strcmp(opts[i].key, "publish") == 0) publish = opts[i].value;
		else if(strcmp(opts[i].key, "subscribe") == 0) subscribe = opts[i].value;
		else if(strcmp(opts[i].key, "root") == 0) root_opt = opts[i].value;
		else if(strcmp(opts[i].key, "rate_bytes") == 0) rate_bytes = strtod(opts[i].value, NULL);
		else if(strcmp(opts[i].key, "burst_bytes") == 0) burst_bytes = strtod(opts[i].value, NULL);
	}
	if(devices_file == NULL){
		mosquitto_log_printf(MOSQ_LOG_ERR, "iotfleet_devices: plugin_opt_devices_file is required");
		return MOSQ_ERR_INVAL;
	}
	root = strdup(root_opt);
	if(split_channels(publish, publish_channels, &publish_count) || split_channels(subscribe, subscribe_channels, &subscribe_count)){
		mosquitto_log_printf(MOSQ_LOG_ERR, "iotfleet_devices: at most %d channels in plugin_opt_publish/subscribe", MAX_CHANNELS);
		return MOSQ_ERR_INVAL;
	}
	struct stat st;
	if(stat(devices_file, &st) == 0) reload("start");
	else mosquitto_log_printf(MOSQ_LOG_NOTICE, "iotfleet_devices: %s does not exist yet: no devices", devices_file);
	int rc = mosquitto_callback_register(plugin_id, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL, NULL);
	if(rc == MOSQ_ERR_SUCCESS) rc = mosquitto_callback_register(plugin_id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL, NULL);
	if(rc == MOSQ_ERR_SUCCESS) rc = mosquitto_callback_register(plugin_id, MOSQ_EVT_RELOAD, on_reload, NULL, NULL);
	if(rc == MOSQ_ERR_SUCCESS) rc = mosquitto_callback_register(plugin_id, MOSQ_EVT_TICK, on_tick, NULL, NULL);
	return rc;
}

int mosquitto_plugin_cleanup(void *userdata, struct mosquitto_opt *opts, int opt_count)
{
	(void)userdata; (void)opts; (void)opt_count;
	mosquitto_callback_unregister(plugin_id, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL);
	mosquitto_callback_unregister(plugin_id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL);
	mosquitto_callback_unregister(plugin_id, MOSQ_EVT_RELOAD, on_reload, NULL);
	mosquitto_callback_unregister(plugin_id, MOSQ_EVT_TICK, on_tick, NULL);
	table_free(&devices);
	for(int i = 0; i < publish_count; i++) free(publish_channels[i]);
	for(int i = 0; i < subscribe_count; i++) free(subscribe_channels[i]);
	free(devices_file);
	free(root);
	devices_file = root = NULL;
	publish_count = subscribe_count = 0;
	have_loaded_stat = false;
	return MOSQ_ERR_SUCCESS;
}
