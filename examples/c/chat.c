/*
 * Petrel from C: open a model, ask one question, stream the answer.
 *
 *   examples/c/run.sh [--aarch64] MODEL [QUESTION]
 *
 * builds libpetrel_c.a, compiles this file against capi/include/petrel.h and runs it
 * (under qemu-aarch64 with --aarch64). MODEL is a GGUF file (or, in builds with the
 * registry, a known model name such as smollm2-135m).
 */
#include <stdio.h>
#include <string.h>

#include "petrel.h"

/* Receives each piece of the reply; `user` counts the bytes written. */
static bool print_piece(const char *piece, size_t len, void *user) {
    fwrite(piece, 1, len, stdout);
    fflush(stdout);
    *(size_t *)user += len;
    return true; /* false would stop the reply */
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s MODEL [QUESTION]\n", argv[0]);
        return 2;
    }
    const char *question = argc > 2 ? argv[2] : "What is the capital of France?";
    fprintf(stderr, "petrel %s\n", petrel_version());

    petrel_model *model = petrel_model_open(argv[1], NULL);
    if (model == NULL) {
        fprintf(stderr, "error: %s\n", petrel_last_error());
        return 1;
    }
    petrel_session_params session_params = petrel_session_default_params();
    uint32_t trained = petrel_model_context_length(model);
    session_params.context = trained < 512 ? trained : 512; /* tokens of KV cache */
    petrel_session *session = petrel_session_new(model, &session_params);
    /* The session keeps the model alive; this handle is no longer needed. */
    petrel_model_free(model);
    if (session == NULL) {
        fprintf(stderr, "error: %s\n", petrel_last_error());
        return 1;
    }

    petrel_chat_message messages[] = {
        {"system", "You are a helpful assistant."},
        {"user", question},
    };
    petrel_sampling_params sampling = petrel_sampling_default_params();
    sampling.max_tokens = 48;
    size_t bytes = 0;
    petrel_status status = petrel_chat(session, messages, 2, &sampling, print_piece, &bytes);
    printf("\n");
    if (status != PETREL_OK) {
        fprintf(stderr, "error %d: %s\n", (int)status, petrel_last_error());
        petrel_session_free(session);
        return 1;
    }
    petrel_completion info;
    if (petrel_session_last_completion(session, &info) == PETREL_OK) {
        fprintf(stderr, "[%u prompt tokens, %u generated, %zu bytes, TTFT %.1f ms, decode %.1f ms]\n",
                info.prompt_tokens, info.completion_tokens, bytes, info.time_to_first_token_ms, info.decode_ms);
    }

    /* Bad input is an error code and a message, never a crash. */
    status = petrel_generate(session, NULL, NULL, NULL, NULL);
    fprintf(stderr, "[a NULL prompt: status %d, \"%s\"]\n", (int)status, petrel_last_error());
    const char not_utf8[] = {'c', 'a', 'f', (char)0xE9, 0};
    status = petrel_generate(session, not_utf8, NULL, NULL, NULL);
    fprintf(stderr, "[invalid UTF-8: status %d, \"%s\"]\n", (int)status, petrel_last_error());

    petrel_session_free(session);
    return 0;
}
