/*
 * tellus-device-c: an example Tellus device in C99 with libmosquitto.
 *
 * It connects to Tellus over MQTT 3.1.1 with mutual TLS (its own certificate and key; the
 * client id is the device id), sends a pretend sensor reading as JSON telemetry every
 * --every seconds at QoS 1, and answers commands:
 *
 *   devices/{id}/telemetry                   <- {"ts": ms, "values": {"temperature": …, "uptime_s": …}}
 *   devices/{id}/commands/{command_id}       -> {"id", "name", "params", "expires_at_ms"}
 *   devices/{id}/commands/{command_id}/result <- {"ok": true|false, "output": …}
 *
 * "ping" is answered {"ok": true, "output": {"pong": <params, or true without params>}},
 * any other command {"ok": false, "output": "unknown command \"<name>\""}.
 *
 * The program is one thread and one loop, as on a microcontroller: mosquitto_loop() does the
 * network work (and calls the callbacks below), and between two calls the loop takes a
 * reading when one is due. It allocates nothing itself: every buffer has a fixed size, and
 * input that does not fit is refused, never truncated.
 *
 * Each event is one line on stdout; errors go to stderr. See README.md to build and run it.
 */

#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <mosquitto.h>

/* ---- Sizes: everything this program keeps is bounded by these. ---- */

/* Tellus device ids are 1 to 64 of A-Z a-z 0-9 . _ - (command ids are "c-" and 20 hex digits). */
#define ID_MAX 64
/* The longest command name this device accepts. */
#define NAME_MAX_LEN 64
/* The longest "params" it echoes back in a pong. */
#define PARAMS_MAX 256
/* A result: room for the longest pong or refusal built below. */
#define RESULT_MAX (PARAMS_MAX + 128)
/* How many handled commands are remembered, to answer a repeated one without acting twice. */
#define HANDLED_MAX 16
/* Readings sent but not yet acknowledged; while this many are, no new reading is taken. */
#define PENDING_MAX 8
/* Nesting depth up to which JSON is parsed. */
#define JSON_DEPTH_MAX 16
/* MQTT keep-alive, and the longest wait between two reconnection attempts (seconds). */
#define KEEPALIVE_S 30
#define BACKOFF_MAX_S 30
/* A connection that lasts this long starts the backoff over when it ends. */
#define STABLE_MS 10000

/* ---- Output: one line per event, flushed at once so a log shows it right away. ---- */

static void say(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stdout, fmt, ap);
    va_end(ap);
    fputc('\n', stdout);
    fflush(stdout);
}

static void complain(const char *fmt, ...)
{
    va_list ap;
    fputs("tellus-device-c: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    fflush(stderr);
}

/* ---- The device's state, handed to every libmosquitto callback. ---- */

struct handled_command {
    char id[ID_MAX + 1]; /* "" for an empty slot */
    char result[RESULT_MAX];
};

struct pending_reading {
    bool used;
    int mid; /* libmosquitto's message id of the PUBLISH */
    unsigned long n;
};

struct device {
    /* From the command line. */
    const char *host;
    int port;
    const char *cafile, *cert, *key, *id;
    long long every_ms;
    unsigned long count; /* 0: forever */

    char telemetry_topic[128];
    char commands_filter[128];

    bool connected; /* between a successful CONNACK and the loss of the connection */
    int backoff_s;  /* the next wait before reconnecting */
    long long connected_ms; /* when the current connection was accepted (monotonic) */

    unsigned long readings_sent;
    long long next_reading_ms; /* monotonic */
    long long started_ms;      /* monotonic */
    struct pending_reading pending[PENDING_MAX];

    struct handled_command handled[HANDLED_MAX]; /* a ring: the oldest is overwritten */
    unsigned handled_next;
};

static volatile sig_atomic_t stop_requested = 0;

static void on_signal(int sig)
{
    (void)sig;
    stop_requested = 1;
}

/* ---- Clocks. ---- */

static long long clock_ms(clockid_t clock)
{
    struct timespec ts;
    if (clock_gettime(clock, &ts) != 0) {
        return 0;
    }
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Sleeps a random time between half of `seconds` and all of it (jitter: a fleet that lost
 * Tellus at one moment does not come back at one moment), or less if a signal arrives
 * (SIGINT/SIGTERM then stop the program). */
static void sleep_jittered_s(int seconds)
{
    long half_ms = (long)seconds * 500L;
    long ms = half_ms + (half_ms > 0 ? (long)(rand() % (half_ms + 1)) : 0);
    struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
    (void)nanosleep(&ts, NULL);
}

/* ---- A minimal JSON reader: just enough to pick the fields of a command. ----
 *
 * It checks the syntax of what it walks through (strings, escapes, nesting) but does not
 * decode strings: a string is kept as written between its quotes, escapes included, which
 * is still valid inside another JSON string, so it can be echoed as is. Every function
 * takes the end of the text and never reads past it.
 */

static const char *skip_ws(const char *p, const char *end)
{
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) {
        p++;
    }
    return p;
}

static bool is_hex(char c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

/* A string at *p (at its opening quote): sets its raw contents and moves past the closing
 * quote. */
static bool read_string(const char **p, const char *end, const char **start, size_t *len)
{
    const char *s = *p;
    if (s >= end || *s != '"') {
        return false;
    }
    s++;
    *start = s;
    while (s < end && *s != '"') {
        if ((unsigned char)*s < 0x20) {
            return false; /* control characters must be escaped */
        }
        if (*s == '\\') {
            s++;
            if (s >= end) {
                return false;
            }
            if (*s == 'u') {
                for (int i = 0; i < 4; i++) {
                    s++;
                    if (s >= end || !is_hex(*s)) {
                        return false;
                    }
                }
            } else if (*s == '\0' || strchr("\"\\/bfnrt", *s) == NULL) {
                return false;
            }
        }
        s++;
    }
    if (s >= end) {
        return false; /* no closing quote */
    }
    *len = (size_t)(s - *start);
    *p = s + 1;
    return true;
}

/* Moves *p past one JSON value of any kind. */
static bool skip_value(const char **p, const char *end, int depth)
{
    const char *s = skip_ws(*p, end);
    const char *str;
    size_t len;
    if (s >= end || depth > JSON_DEPTH_MAX) {
        return false;
    }
    if (*s == '"') {
        if (!read_string(&s, end, &str, &len)) {
            return false;
        }
    } else if (*s == '{' || *s == '[') {
        char close = *s == '{' ? '}' : ']';
        s = skip_ws(s + 1, end);
        if (s < end && *s == close) {
            *p = s + 1;
            return true;
        }
        for (;;) {
            if (close == '}') {
                s = skip_ws(s, end);
                if (!read_string(&s, end, &str, &len)) {
                    return false;
                }
                s = skip_ws(s, end);
                if (s >= end || *s != ':') {
                    return false;
                }
                s++;
            }
            if (!skip_value(&s, end, depth + 1)) {
                return false;
            }
            s = skip_ws(s, end);
            if (s < end && *s == ',') {
                s++;
            } else if (s < end && *s == close) {
                s++;
                break;
            } else {
                return false;
            }
        }
    } else if (*s == 't' || *s == 'f' || *s == 'n') {
        const char *word = *s == 't' ? "true" : *s == 'f' ? "false" : "null";
        size_t word_len = strlen(word);
        if ((size_t)(end - s) < word_len || memcmp(s, word, word_len) != 0) {
            return false;
        }
        s += word_len;
    } else {
        /* A number: a run of these characters (checked loosely). */
        const char *start = s;
        while (s < end && *s != '\0' && strchr("+-.0123456789eE", *s) != NULL) {
            s++;
        }
        if (s == start) {
            return false;
        }
    }
    *p = s;
    return true;
}

/* Copies a raw string into `out` (size `size`), refusing one that does not fit. */
static bool copy_bounded(char *out, size_t size, const char *s, size_t len)
{
    if (len >= size) {
        return false;
    }
    memcpy(out, s, len);
    out[len] = '\0';
    return true;
}

struct command {
    char id[ID_MAX + 1];            /* the "id" field, "" if absent */
    char name[NAME_MAX_LEN + 1];    /* raw JSON string contents */
    const char *params;             /* raw JSON of "params", or NULL */
    size_t params_len;
};

/* Picks "id", "name" and "params" out of a command's JSON object. Returns NULL, or why the
 * payload is not a command this device can take. */
static const char *parse_command(const char *json, size_t json_len, struct command *cmd)
{
    const char *p = json, *end = json + json_len;
    bool have_name = false;
    memset(cmd, 0, sizeof(*cmd));

    p = skip_ws(p, end);
    if (p >= end || *p != '{') {
        return "not a JSON object";
    }
    p = skip_ws(p + 1, end);
    if (p < end && *p == '}') {
        return "no name";
    }
    for (;;) {
        const char *key, *value;
        size_t key_len, value_len;
        p = skip_ws(p, end);
        if (!read_string(&p, end, &key, &key_len)) {
            return "not valid JSON";
        }
        p = skip_ws(p, end);
        if (p >= end || *p != ':') {
            return "not valid JSON";
        }
        p = skip_ws(p + 1, end);
        bool is_id = key_len == 2 && memcmp(key, "id", 2) == 0;
        bool is_name = key_len == 4 && memcmp(key, "name", 4) == 0;
        if (is_id || is_name) {
            if (!read_string(&p, end, &value, &value_len)) {
                return is_id ? "id is not a string" : "name is not a string";
            }
            if (is_id && !copy_bounded(cmd->id, sizeof(cmd->id), value, value_len)) {
                return "id too long";
            }
            if (is_name) {
                if (!copy_bounded(cmd->name, sizeof(cmd->name), value, value_len)) {
                    return "name too long";
                }
                have_name = true;
            }
        } else if (key_len == 6 && memcmp(key, "params", 6) == 0) {
            cmd->params = p;
            if (!skip_value(&p, end, 1)) {
                return "not valid JSON";
            }
            cmd->params_len = (size_t)(p - cmd->params);
        } else if (!skip_value(&p, end, 1)) {
            return "not valid JSON";
        }
        p = skip_ws(p, end);
        if (p < end && *p == ',') {
            p++;
        } else if (p < end && *p == '}') {
            p++;
            break;
        } else {
            return "not valid JSON";
        }
    }
    if (skip_ws(p, end) != end) {
        return "not valid JSON";
    }
    return have_name ? NULL : "no name";
}

/* ---- Commands. ---- */

/* Whether `s` is a valid id for Tellus (devices and commands): 1 to ID_MAX of A-Z a-z 0-9 . _ -
 * Safe to put in a topic, a JSON string or a log line as is. */
static bool valid_id(const char *s, size_t len)
{
    if (len == 0 || len > ID_MAX) {
        return false;
    }
    for (size_t i = 0; i < len; i++) {
        char c = s[i];
        bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                  c == '.' || c == '_' || c == '-';
        if (!ok) {
            return false;
        }
    }
    return true;
}

/* Builds the answer to `cmd` in `result`. Returns false if it does not fit (it always does
 * with the sizes above; checked all the same). This is where a real device acts. */
static bool run_command(const struct command *cmd, const char *refusal, char *result, size_t size)
{
    int n;
    if (refusal != NULL) {
        n = snprintf(result, size, "{\"ok\": false, \"output\": \"malformed command: %s\"}", refusal);
    } else if (strcmp(cmd->name, "ping") == 0) {
        bool has_params = cmd->params != NULL && !(cmd->params_len == 4 && memcmp(cmd->params, "null", 4) == 0);
        if (has_params && cmd->params_len > PARAMS_MAX) {
            n = snprintf(result, size, "{\"ok\": false, \"output\": \"params longer than %d bytes\"}", PARAMS_MAX);
        } else if (has_params) {
            n = snprintf(result, size, "{\"ok\": true, \"output\": {\"pong\": %.*s}}", (int)cmd->params_len,
                         cmd->params);
        } else {
            n = snprintf(result, size, "{\"ok\": true, \"output\": {\"pong\": true}}");
        }
    } else {
        /* The name is a JSON string's raw contents: valid inside this JSON string too. */
        n = snprintf(result, size, "{\"ok\": false, \"output\": \"unknown command \\\"%s\\\"\"}", cmd->name);
    }
    return n >= 0 && (size_t)n < size;
}

static void publish_result(struct mosquitto *mosq, struct device *dev, const char *command_id, const char *result)
{
    char topic[256];
    int n = snprintf(topic, sizeof(topic), "devices/%s/commands/%s/result", dev->id, command_id);
    if (n < 0 || (size_t)n >= sizeof(topic)) {
        complain("command %s: result topic too long", command_id);
        return;
    }
    /* QoS 1: Tellus acknowledges a result once it has recorded it. If the connection is lost
     * first, libmosquitto sends it again after reconnecting. */
    int rc = mosquitto_publish(mosq, NULL, topic, (int)strlen(result), result, 1, false);
    if (rc != MOSQ_ERR_SUCCESS) {
        complain("command %s: result not sent: %s", command_id, mosquitto_strerror(rc));
    }
}

static void on_message(struct mosquitto *mosq, void *obj, const struct mosquitto_message *msg)
{
    struct device *dev = obj;
    char prefix[128];
    int n = snprintf(prefix, sizeof(prefix), "devices/%s/commands/", dev->id);
    size_t prefix_len = (size_t)n;
    if (n < 0 || prefix_len >= sizeof(prefix) || msg->topic == NULL || strncmp(msg->topic, prefix, prefix_len) != 0) {
        complain("message on unexpected topic %s ignored", msg->topic ? msg->topic : "(none)");
        return;
    }

    /* The command id: the topic's last level (the filter's +). */
    const char *topic_id = msg->topic + prefix_len;
    size_t topic_id_len = strlen(topic_id);
    if (!valid_id(topic_id, topic_id_len)) {
        complain("command on topic %s ignored: not a command id", msg->topic);
        return;
    }
    char command_id[ID_MAX + 1];
    memcpy(command_id, topic_id, topic_id_len + 1);

    /* Tellus may send a command again if our acknowledgement was lost: answer it again, but
     * act only once. */
    for (int i = 0; i < HANDLED_MAX; i++) {
        if (strcmp(dev->handled[i].id, command_id) == 0) {
            publish_result(mosq, dev, command_id, dev->handled[i].result);
            say("command %s repeated: result sent again", command_id);
            return;
        }
    }

    struct command cmd;
    const char *refusal = NULL;
    if (msg->payloadlen < 0 || msg->payload == NULL) {
        refusal = "empty";
        memset(&cmd, 0, sizeof(cmd));
    } else {
        refusal = parse_command(msg->payload, (size_t)msg->payloadlen, &cmd);
    }
    if (refusal == NULL && cmd.id[0] != '\0' && strcmp(cmd.id, command_id) != 0) {
        complain("command %s: its payload says id %s; the topic's id is used", command_id, cmd.id);
    }

    struct handled_command *slot = &dev->handled[dev->handled_next % HANDLED_MAX];
    if (!run_command(&cmd, refusal, slot->result, sizeof(slot->result))) {
        complain("command %s: result does not fit in %d bytes", command_id, RESULT_MAX);
        return;
    }
    memcpy(slot->id, command_id, topic_id_len + 1);
    dev->handled_next++;

    publish_result(mosq, dev, command_id, slot->result);
    say("command %s (%s) answered: %s", command_id, refusal ? "malformed" : cmd.name, slot->result);
}

/* ---- Connection. ---- */

static void on_connect(struct mosquitto *mosq, void *obj, int rc)
{
    struct device *dev = obj;
    if (rc != 0) {
        /* Refused, e.g. an unknown, disabled or revoked device. The broker closes the
         * connection and the main loop tries again later. */
        complain("connection refused: %s", mosquitto_connack_string(rc));
        return;
    }
    dev->connected = true;
    dev->connected_ms = clock_ms(CLOCK_MONOTONIC);
    say("connected to %s:%d as %s", dev->host, dev->port, dev->id);

    /* A clean session: subscribe again on every connection. QoS 1, so that our PUBACK tells
     * Tellus the command was delivered. Commands queued meanwhile arrive now. */
    int sub = mosquitto_subscribe(mosq, NULL, dev->commands_filter, 1);
    if (sub != MOSQ_ERR_SUCCESS) {
        complain("subscribe to %s failed: %s", dev->commands_filter, mosquitto_strerror(sub));
    }
}

static void on_subscribe(struct mosquitto *mosq, void *obj, int mid, int qos_count, const int *granted_qos)
{
    struct device *dev = obj;
    (void)mosq;
    (void)mid;
    if (qos_count < 1 || granted_qos[0] > 2) {
        complain("subscription to %s refused", dev->commands_filter);
        return;
    }
    say("subscribed to %s (QoS %d)", dev->commands_filter, granted_qos[0]);
}

static void on_disconnect(struct mosquitto *mosq, void *obj, int rc)
{
    struct device *dev = obj;
    (void)mosq;
    (void)rc; /* 0 after our own DISCONNECT; the main loop reports a loss */
    /* libmosquitto calls this before mosquitto_loop() returns the loss: a connection that
     * lasted starts the backoff over here. */
    if (dev->connected && clock_ms(CLOCK_MONOTONIC) - dev->connected_ms >= STABLE_MS) {
        dev->backoff_s = 1;
    }
    dev->connected = false;
}

/* A PUBACK: for a reading, Tellus has stored it on disk. */
static void on_publish(struct mosquitto *mosq, void *obj, int mid)
{
    struct device *dev = obj;
    (void)mosq;
    for (int i = 0; i < PENDING_MAX; i++) {
        if (dev->pending[i].used && dev->pending[i].mid == mid) {
            dev->pending[i].used = false;
            say("reading %lu acknowledged", dev->pending[i].n);
            return;
        }
    }
    /* Not a reading: a command's result. */
}

/* ---- Readings. ---- */

static struct pending_reading *free_pending_slot(struct device *dev)
{
    for (int i = 0; i < PENDING_MAX; i++) {
        if (!dev->pending[i].used) {
            return &dev->pending[i];
        }
    }
    return NULL;
}

/* Whether the device takes readings now (when they are due): while connected, until it has
 * sent --count of them, and while fewer than PENDING_MAX await their acknowledgement. This
 * example keeps no backlog: a real device would store readings taken while offline and send
 * them later, each with its own time. */
static bool reading(struct device *dev)
{
    return dev->connected && (dev->count == 0 || dev->readings_sent < dev->count) && free_pending_slot(dev) != NULL;
}

/* Takes and sends a reading if one is due. */
static void maybe_take_reading(struct mosquitto *mosq, struct device *dev)
{
    long long now = clock_ms(CLOCK_MONOTONIC);
    if (!reading(dev) || now < dev->next_reading_ms) {
        return;
    }
    struct pending_reading *slot = free_pending_slot(dev);
    if (slot == NULL) {
        return; /* cannot happen: reading() found one */
    }

    unsigned long n = dev->readings_sent + 1;
    /* A pretend sensor. "ts" is the device's own time (ms since the epoch): if a PUBACK is
     * lost and the reading sent again, Tellus stores it once, at this time. */
    double temperature = 20.0 + (double)(n % 10) * 0.5;
    long long uptime_s = (now - dev->started_ms) / 1000;
    char payload[160];
    int len = snprintf(payload, sizeof(payload), "{\"ts\": %lld, \"values\": {\"temperature\": %.1f, \"uptime_s\": %lld}}",
                       clock_ms(CLOCK_REALTIME), temperature, uptime_s);
    if (len < 0 || (size_t)len >= sizeof(payload)) {
        complain("reading %lu does not fit in %zu bytes", n, sizeof(payload));
        return;
    }

    int mid = 0;
    int rc = mosquitto_publish(mosq, &mid, dev->telemetry_topic, len, payload, 1, false);
    if (rc == MOSQ_ERR_SUCCESS) {
        slot->used = true;
        slot->mid = mid;
        slot->n = n;
    } else {
        /* The connection broke as we sent it. libmosquitto keeps a QoS 1 message it has
         * queued and sends it after reconnecting, but we do not wait for its PUBACK. */
        complain("reading %lu: %s (it may still be sent after reconnecting)", n, mosquitto_strerror(rc));
    }
    dev->readings_sent = n;
    dev->next_reading_ms += dev->every_ms;
    if (dev->next_reading_ms < now) {
        dev->next_reading_ms = now + dev->every_ms; /* fell behind (e.g. offline): no burst */
    }
}

/* How long mosquitto_loop() may wait for the network before a reading is due (ms). It returns
 * as soon as something arrives (a CONNACK, a PUBACK, a command), so at most a second when no
 * reading is due. */
static int loop_timeout_ms(struct device *dev)
{
    if (!reading(dev)) {
        return 1000;
    }
    long long wait = dev->next_reading_ms - clock_ms(CLOCK_MONOTONIC);
    if (wait < 0) {
        return 0;
    }
    return wait > 1000 ? 1000 : (int)wait;
}

/* ---- Command line. ---- */

static void usage(FILE *out)
{
    fprintf(out,
            "usage: tellus-device-c --host HOST --port PORT --cafile CA.crt --cert ID.crt --key ID.key\n"
            "                       --id ID [--every SECONDS] [--count N]\n"
            "\n"
            "An example Tellus device: sends a reading every SECONDS (default 5, may be fractional)\n"
            "at QoS 1 on devices/ID/telemetry, N of them (default 0: forever), and answers commands\n"
            "(\"ping\") until stopped with SIGINT or SIGTERM.\n");
}

static bool parse_long(const char *s, long min, long max, long *out)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno != 0 || end == s || *end != '\0' || v < min || v > max) {
        return false;
    }
    *out = v;
    return true;
}

/* Returns 0 when the arguments are complete and valid, else the exit code (after printing why). */
static int parse_args(int argc, char **argv, struct device *dev)
{
    double every_s = 5.0;
    long count = 0;
    long port = 0;
    for (int i = 1; i < argc; i++) {
        const char *flag = argv[i];
        if (strcmp(flag, "--help") == 0 || strcmp(flag, "-h") == 0) {
            usage(stdout);
            exit(0);
        }
        if (i + 1 >= argc) {
            complain("%s needs a value (see --help)", flag);
            return 2;
        }
        const char *value = argv[++i];
        if (strcmp(flag, "--host") == 0) {
            dev->host = value;
        } else if (strcmp(flag, "--port") == 0) {
            if (!parse_long(value, 1, 65535, &port)) {
                complain("--port: not a port: %s", value);
                return 2;
            }
            dev->port = (int)port;
        } else if (strcmp(flag, "--cafile") == 0) {
            dev->cafile = value;
        } else if (strcmp(flag, "--cert") == 0) {
            dev->cert = value;
        } else if (strcmp(flag, "--key") == 0) {
            dev->key = value;
        } else if (strcmp(flag, "--id") == 0) {
            dev->id = value;
        } else if (strcmp(flag, "--every") == 0) {
            char *end;
            errno = 0;
            every_s = strtod(value, &end);
            if (errno != 0 || end == value || *end != '\0' || !(every_s >= 0.001 && every_s <= 86400.0)) {
                complain("--every: seconds from 0.001 to 86400, not %s", value);
                return 2;
            }
        } else if (strcmp(flag, "--count") == 0) {
            if (!parse_long(value, 0, 1000000000L, &count)) {
                complain("--count: not a number of readings: %s", value);
                return 2;
            }
        } else {
            complain("unknown option %s (see --help)", flag);
            return 2;
        }
    }
    if (!dev->host || !dev->port || !dev->cafile || !dev->cert || !dev->key || !dev->id) {
        usage(stderr);
        return 2;
    }
    if (!valid_id(dev->id, strlen(dev->id))) {
        complain("--id: 1 to %d of A-Z a-z 0-9 . _ -, not %s", ID_MAX, dev->id);
        return 2;
    }
    dev->every_ms = (long long)(every_s * 1000.0 + 0.5);
    dev->count = (unsigned long)count;
    /* With a valid id these fit; checked all the same. */
    int a = snprintf(dev->telemetry_topic, sizeof(dev->telemetry_topic), "devices/%s/telemetry", dev->id);
    int b = snprintf(dev->commands_filter, sizeof(dev->commands_filter), "devices/%s/commands/+", dev->id);
    if (a < 0 || (size_t)a >= sizeof(dev->telemetry_topic) || b < 0 || (size_t)b >= sizeof(dev->commands_filter)) {
        complain("--id too long");
        return 2;
    }
    return 0;
}

/* ---- Main loop. ---- */

int main(int argc, char **argv)
{
    static struct device dev; /* static: zeroed, and not on the stack */
    int rc = parse_args(argc, argv, &dev);
    if (rc != 0) {
        return rc;
    }

    /* SIGINT/SIGTERM end the program cleanly; without SA_RESTART they also cut a wait short. */
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGINT, &sa, NULL) != 0 || sigaction(SIGTERM, &sa, NULL) != 0) {
        complain("sigaction: %s", strerror(errno));
        return 1;
    }
    /* A write to a connection the server has closed must be an error, not the end of us. */
    sa.sa_handler = SIG_IGN;
    if (sigaction(SIGPIPE, &sa, NULL) != 0) {
        complain("sigaction: %s", strerror(errno));
        return 1;
    }

    if (mosquitto_lib_init() != MOSQ_ERR_SUCCESS) {
        complain("mosquitto_lib_init failed");
        return 1;
    }
    /* The client id must be the device id (the certificate's CN). Clean session: no state is
     * kept by the broker between connections. */
    struct mosquitto *mosq = mosquitto_new(dev.id, true, &dev);
    if (mosq == NULL) {
        complain("mosquitto_new: %s", strerror(errno));
        mosquitto_lib_cleanup();
        return 1;
    }
    rc = mosquitto_int_option(mosq, MOSQ_OPT_PROTOCOL_VERSION, MQTT_PROTOCOL_V311);
    if (rc == MOSQ_ERR_SUCCESS) {
        /* Mutual TLS: Tellus's server certificate is checked against the fleet CA (and its
         * name against --host); ours proves who we are. */
        rc = mosquitto_tls_set(mosq, dev.cafile, NULL, dev.cert, dev.key, NULL);
    }
    if (rc != MOSQ_ERR_SUCCESS) {
        complain("TLS setup with %s, %s, %s: %s", dev.cafile, dev.cert, dev.key, mosquitto_strerror(rc));
        mosquitto_destroy(mosq);
        mosquitto_lib_cleanup();
        return 1;
    }
    mosquitto_connect_callback_set(mosq, on_connect);
    mosquitto_disconnect_callback_set(mosq, on_disconnect);
    mosquitto_subscribe_callback_set(mosq, on_subscribe);
    mosquitto_message_callback_set(mosq, on_message);
    mosquitto_publish_callback_set(mosq, on_publish);

    dev.started_ms = clock_ms(CLOCK_MONOTONIC);
    srand((unsigned)(dev.started_ms ^ (long long)getpid()));
    dev.next_reading_ms = dev.started_ms;
    dev.backoff_s = 1;

    /* The first attempt: TCP and the TLS handshake happen here; the CONNACK comes later,
     * through mosquitto_loop() and on_connect(). */
    bool reconnect = false;
    rc = mosquitto_connect(mosq, dev.host, dev.port, KEEPALIVE_S);
    if (rc != MOSQ_ERR_SUCCESS) {
        complain("cannot connect to %s:%d: %s", dev.host, dev.port,
                 rc == MOSQ_ERR_ERRNO ? strerror(errno) : mosquitto_strerror(rc));
        reconnect = true;
    }

    while (!stop_requested) {
        if (reconnect) {
            /* Wait, longer after each failure (up to 1, 2, 4 … 30 s, with jitter; back to 1 s
             * after a connection that lasted 10 s), so a fleet does not hammer a server that
             * is coming back, nor one that keeps closing its connection. */
            complain("reconnecting in at most %d s", dev.backoff_s);
            sleep_jittered_s(dev.backoff_s);
            if (stop_requested) {
                break;
            }
            dev.backoff_s = dev.backoff_s * 2 > BACKOFF_MAX_S ? BACKOFF_MAX_S : dev.backoff_s * 2;
            rc = mosquitto_reconnect(mosq);
            if (rc != MOSQ_ERR_SUCCESS) {
                complain("cannot connect to %s:%d: %s", dev.host, dev.port,
                         rc == MOSQ_ERR_ERRNO ? strerror(errno) : mosquitto_strerror(rc));
                continue;
            }
            reconnect = false;
        }
        /* Network work: reads, writes, keep-alive pings, and the callbacks above. */
        rc = mosquitto_loop(mosq, loop_timeout_ms(&dev), 1);
        if (rc != MOSQ_ERR_SUCCESS) {
            if (stop_requested) {
                break;
            }
            dev.connected = false; /* on_disconnect has usually said so already */
            complain("connection lost: %s", rc == MOSQ_ERR_ERRNO ? strerror(errno) : mosquitto_strerror(rc));
            reconnect = true;
            continue;
        }
        maybe_take_reading(mosq, &dev);
    }

    say("stopping");
    if (dev.connected) {
        rc = mosquitto_disconnect(mosq);
        if (rc == MOSQ_ERR_SUCCESS) {
            (void)mosquitto_loop(mosq, 100, 1); /* let the DISCONNECT out */
        }
    }
    mosquitto_destroy(mosq);
    mosquitto_lib_cleanup();
    return 0;
}
