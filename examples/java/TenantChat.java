import java.io.ByteArrayOutputStream;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.UUID;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

/**
 * Two tenants of one `edgelora serve`, each with its own API key and LoRA adapter, and a third adapter
 * uploaded at runtime and used at once. JDK only (java.net.http), no build tool:
 *
 *   java TenantChat.java
 *
 * Settings come from the environment (defaults in brackets): EDGELORA_URL [http://127.0.0.1:8000],
 * TENANT_A_KEY / TENANT_A_MODEL, TENANT_B_KEY / TENANT_B_MODEL, ADMIN_KEY, UPLOAD_BLOB (a .onnx_adapter
 * with its NAME.json sidecar beside it, as `edgelora add-adapter` writes them), UPLOAD_NAME, UPLOAD_TENANT_KEY
 * (the tenant that then uses it), PROMPT, MAX_TOKENS [16].
 */
public class TenantChat {
    static final HttpClient HTTP = HttpClient.newHttpClient();
    static final String URL = env("EDGELORA_URL", "http://127.0.0.1:8000");

    public static void main(String[] args) throws Exception {
        String prompt = env("PROMPT", "Hello there");
        complete(env("TENANT_A_KEY", "none"), env("TENANT_A_MODEL", "reverse"), prompt);
        complete(env("TENANT_B_KEY", "none"), env("TENANT_B_MODEL", "caesar"), prompt);

        String blob = System.getenv("UPLOAD_BLOB");
        if (blob != null) {
            String name = env("UPLOAD_NAME", "uploaded");
            upload(env("ADMIN_KEY", "none"), name, Path.of(blob));
            complete(env("UPLOAD_TENANT_KEY", env("ADMIN_KEY", "none")), name, prompt);
        }
    }

    /** POST /v1/completions as the tenant of `key`; `model` picks the adapter. Prints the answer as JSON text. */
    static void complete(String key, String model, String prompt) throws Exception {
        String body = "{\"model\": " + quote(model) + ", \"prompt\": " + quote(prompt)
                + ", \"max_tokens\": " + env("MAX_TOKENS", "16") + ", \"temperature\": 0}";
        HttpRequest request = HttpRequest.newBuilder(URI.create(URL + "/v1/completions"))
                .header("Authorization", "Bearer " + key)
                .header("Content-Type", "application/json")
                .POST(HttpRequest.BodyPublishers.ofString(body))
                .build();
        String reply = send(request, 200);
        Matcher text = Pattern.compile("\"text\":(\"(?:[^\"\\\\]|\\\\.)*\")").matcher(reply);
        if (!text.find()) {
            throw new IllegalStateException("no text in the reply: " + reply);
        }
        System.out.println("[" + model + "] " + text.group(1));
    }

    /** POST /v1/adapters (admin key): the blob and its sidecar as multipart/form-data. */
    static void upload(String adminKey, String name, Path blob) throws Exception {
        String sidecarName = blob.getFileName().toString().replaceFirst("\\.onnx_adapter$", "") + ".json";
        Path sidecar = blob.resolveSibling(sidecarName);
        String boundary = "edgelora-" + UUID.randomUUID();
        ByteArrayOutputStream form = new ByteArrayOutputStream();
        part(form, boundary, "name", null, name.getBytes(StandardCharsets.UTF_8));
        part(form, boundary, "adapter", blob.getFileName().toString(), Files.readAllBytes(blob));
        part(form, boundary, "sidecar", sidecarName, Files.readAllBytes(sidecar));
        form.write(("--" + boundary + "--\r\n").getBytes(StandardCharsets.UTF_8));
        HttpRequest request = HttpRequest.newBuilder(URI.create(URL + "/v1/adapters"))
                .header("Authorization", "Bearer " + adminKey)
                .header("Content-Type", "multipart/form-data; boundary=" + boundary)
                .POST(HttpRequest.BodyPublishers.ofByteArray(form.toByteArray()))
                .build();
        send(request, 201);
        System.out.println("uploaded " + name + " (" + Files.size(blob) + " bytes)");
    }

    static void part(ByteArrayOutputStream form, String boundary, String field, String filename, byte[] data)
            throws Exception {
        String head = "--" + boundary + "\r\nContent-Disposition: form-data; name=\"" + field + "\""
                + (filename == null ? "" : "; filename=\"" + filename + "\"\r\nContent-Type: application/octet-stream")
                + "\r\n\r\n";
        form.write(head.getBytes(StandardCharsets.UTF_8));
        form.write(data);
        form.write("\r\n".getBytes(StandardCharsets.UTF_8));
    }

    /** The reply's body, or an exception with the server's one-line OpenAI error. */
    static String send(HttpRequest request, int expected) throws Exception {
        HttpResponse<String> reply = HTTP.send(request, HttpResponse.BodyHandlers.ofString());
        if (reply.statusCode() != expected) {
            throw new IllegalStateException(request.uri() + ": HTTP " + reply.statusCode() + " " + reply.body());
        }
        return reply.body();
    }

    static String quote(String text) {
        StringBuilder out = new StringBuilder("\"");
        for (char c : text.toCharArray()) {
            switch (c) {
                case '"' -> out.append("\\\"");
                case '\\' -> out.append("\\\\");
                case '\n' -> out.append("\\n");
                case '\r' -> out.append("\\r");
                case '\t' -> out.append("\\t");
                default -> out.append(c < 0x20 ? String.format("\\u%04x", (int) c) : String.valueOf(c));
            }
        }
        return out.append('"').toString();
    }

    static String env(String name, String fallback) {
        String value = System.getenv(name);
        return value == null || value.isEmpty() ? fallback : value;
    }
}
