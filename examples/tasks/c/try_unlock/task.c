/* try_unlock: true when the context key `key` is "abc", else FAIL. */
#include <stdlib.h>
#include <string.h>

#include <sluice.h>

sluice_result run(const sluice_json *input) {
    (void)input;
    char *key = sluice_context_get("key");
    int unlocked = key && strcmp(key, "abc") == 0;
    free(key);
    if (unlocked)
        return sluice_ok("true");
    return sluice_fail("the context key `key` does not unlock this task");
}
