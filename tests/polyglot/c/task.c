/* The C test guest: the input's "do" picks a behaviour (see ../README.md). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <sluice.h>

#include "probe.h"
#include "words.h"

static void put_string_or_null(sluice_buf *b, const char *s) {
    if (s) sluice_buf_json_string(b, s, strlen(s));
    else sluice_buf_puts(b, "null");
}

static sluice_result context_values(const sluice_json *keys) {
    sluice_buf b = {0};
    char *s;
    sluice_buf_puts(&b, "{\"flow_run_id\":");
    put_string_or_null(&b, s = sluice_flow_run_id());
    free(s);
    sluice_buf_puts(&b, ",\"task_run_id\":");
    put_string_or_null(&b, s = sluice_task_run_id());
    free(s);
    sluice_buf_puts(&b, ",\"task_name\":");
    put_string_or_null(&b, s = sluice_task_name());
    free(s);
    sluice_buf_printf(&b, ",\"attempt\":%u,\"map_index\":", sluice_attempt());
    uint32_t index;
    if (sluice_map_index(&index)) sluice_buf_printf(&b, "%u", index);
    else sluice_buf_puts(&b, "null");
    /* The parameters are JSON text already. */
    sluice_buf_puts(&b, ",\"parameters\":");
    sluice_buf_puts(&b, s = sluice_parameters());
    free(s);
    sluice_buf_puts(&b, ",\"get\":{");
    for (size_t i = 0; i < sluice_json_len(keys); i++) {
        const char *key = sluice_json_string(sluice_json_at(keys, i));
        if (!key) continue;
        if (i) sluice_buf_puts(&b, ",");
        sluice_buf_json_string(&b, key, strlen(key));
        sluice_buf_puts(&b, ":");
        put_string_or_null(&b, s = sluice_context_get(key));
        free(s);
    }
    sluice_buf_puts(&b, "}}");
    return sluice_ok_buf(&b);
}

sluice_result run(const sluice_json *input) {
    const char *mode = sluice_json_string(sluice_json_get(input, "do"));
    if (!mode) return sluice_fail("the input has no string \"do\"");
    if (strcmp(mode, "fail") == 0) return sluice_fail("failing on purpose");
    if (strcmp(mode, "retry") == 0) return sluice_retry(-1, "try again");
    if (strcmp(mode, "retry_after") == 0)
        return sluice_retry(sluice_json_int(sluice_json_get(input, "ms")), "later");
    if (strcmp(mode, "skip") == 0) return sluice_skip("nothing to do");
    if (strcmp(mode, "pause") == 0) return sluice_pause("waiting for approval");
    if (strcmp(mode, "success") == 0) return sluice_success("{\"answer\":42}", "done early");
    if (strcmp(mode, "context") == 0) return context_values(sluice_json_get(input, "keys"));
    if (strcmp(mode, "log") == 0) {
        sluice_log_trace("trace line");
        sluice_log_debug("debug line");
        sluice_log_info("info line");
        sluice_log_warn("warn line");
        sluice_log_error("error line");
        printf("to stdout\n");
        fprintf(stderr, "to stderr\n");
        return sluice_ok("\"logged\"");
    }
    if (strcmp(mode, "loop") == 0) {
        volatile unsigned long i = 0;
        for (;;) i++;
    }
    if (strcmp(mode, "memory_bomb") == 0) {
        for (;;) {
            volatile char *block = malloc(1 << 20);
            if (!block) {
                fprintf(stderr, "out of memory\n");
                abort();
            }
            block[4096] = 1;
        }
    }
    if (strcmp(mode, "crash") == 0) {
        fprintf(stderr, "boom\n");
        abort();
    }
    if (strcmp(mode, "echo") == 0) {
        sluice_buf b = {0};
        sluice_buf_json(&b, sluice_json_get(input, "value"));
        return sluice_ok_buf(&b);
    }
    if (strcmp(mode, "words") == 0) {
        const char *text = sluice_json_string(sluice_json_get(input, "text"));
        if (!text) return sluice_fail("the input has no string \"text\"");
        sluice_buf b = {0};
        sluice_buf_printf(&b, "{\"words\":%zu}", count_words(text));
        return sluice_ok_buf(&b);
    }
    if (strcmp(mode, "probe") == 0) return probe(sluice_json_get(input, "steps"));
    return sluice_fail("unknown mode \"%s\"", mode);
}
